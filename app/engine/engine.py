"""The engine: one thread owns the model and loops schedule() -> run -> update_from_output().

Callers (the HTTP layer) submit requests from their event loop and receive RequestOutput events on an
asyncio queue; they never see tensors. Aborts are applied between steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from app.engine.detokenizer import Detokenizer
from app.engine.model_runner import ModelRunner
from app.engine.scheduler import QueueFull, Scheduler
from app.engine.threads import ThreadGovernor
from app.engine.types import (
    EngineError,
    EngineRequest,
    ErrorKind,
    FinishReason,
    GenerationRequest,
    Mode,
    PromptSetRef,
    RequestOutput,
    SamplingParams,
    SeqStatus,
    Sequence,
)
from app.model.families import check_config
from app.model.loader import LoadedModel
from app.settings import default_cache_dir

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "InvalidEngineRequest", "QueueFull", "RequestTooLong"]


# seconds without work before the KV cache gives back what a burst grew it to (a regrowth zeroes new tensors)
CACHE_SHRINK_AFTER_IDLE_S = 10.0


class InvalidEngineRequest(ValueError):
    """A request the engine refuses before it joins a step (it would fail there); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestTooLong(InvalidEngineRequest):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_model_len: int = 2048
    max_queue: int = 256
    max_prefills_per_step: int = 16
    max_prefill_tokens: int = 1024  # prompt tokens (padded) one step prefills; longer prompts go in chunks
    prefix_cache_size: int = 4096
    prefix_cache_bytes: int = 1 << 30
    pack_weights: bool = True  # CPU: oneDNN-packed linear weights (faster)
    # the packed copies replace the model's own weights (held once; the model's own forward stops working):
    # for an owner that serves only through the engine, as the server does
    release_model_weights: bool = False
    # CPU, bf16: the native 1-2-row kernel keeps a plain copy of the linear weights beside the packed one
    # only up to this many bytes
    small_batch_copy_bytes: int = 1 << 30
    # CPU: run fewer threads while other processes compete for the cores (ThreadGovernor)
    adaptive_threads: bool = False
    # the KV cache's memory budget: sequences are admitted while their reserved lengths fit it; None: room
    # for max_num_seqs rows of the full context (the cache still grows only as far as they need)
    kv_cache_bytes: int | None = None
    # keys and values of prompt beginnings kept for later prompts that begin the same way (0: off)
    prompt_cache_bytes: int = 128 << 20
    # speculative decoding (speculation.py): tokens proposed from the sequence's own prompt and output that a
    # decode step of one or two sequences checks at once, where the check changes no output (0: off)
    speculative_tokens: int = 3
    # CPU: where the native decode-attention kernel is built and cached (app/engine/kernels); None: SDPA only
    kernel_cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))


@dataclass(frozen=True)
class EngineStats:
    steps: int  # model steps run
    busy_seconds: float  # spent running the model
    waiting: int  # requests queued for a batch row
    running: int  # sequences in the running batch
    prefix_hits: int  # device prompt-set cache
    prefix_misses: int
    prefixes_resident: int
    threads: int  # CPU threads the model runs on now
    kv_cache_bytes: int = 0  # allocated now
    kv_cache_budget_bytes: int = 0
    # the prompt cache: prompt tokens of the requests that could reuse blocks, those copied instead of
    # prefilled, and its memory
    prompt_cache_prompt_tokens: int = 0
    prompt_cache_hit_tokens: int = 0
    prompt_cache_bytes: int = 0
    # speculative decoding: proposed tokens checked, and those the model chose too (each one a step saved)
    speculative_draft_tokens: int = 0
    speculative_accepted_tokens: int = 0


def _failure_message(exc: Exception) -> str:
    return f"the engine could not run this request: {type(exc).__name__}: {exc}"


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue_, out in items:
        queue_.put_nowait(out)


def _settle(future: Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # reported to the caller; the loop goes on
        future.set_exception(exc)


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: Detokenizer


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.max_model_len = min(config.max_model_len, loaded.max_position_embeddings)
        # what the forward serves exactly depends on the context too (a sliding window, a dynamic rotary)
        check_config(loaded.model.config, self.max_model_len)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_queue, config.max_prefills_per_step,
                                   loaded.stop_token_ids, config.max_prefill_tokens)
        self.runner = ModelRunner(loaded.model, loaded.spec, loaded.device, loaded.dtype,
                                  config.max_num_seqs, self.max_model_len, config.prefix_cache_size,
                                  config.prefix_cache_bytes, config.pack_weights, config.kernel_cache_dir,
                                  config.release_model_weights, config.small_batch_copy_bytes,
                                  config.kv_cache_bytes, config.prompt_cache_bytes, config.speculative_tokens,
                                  loaded.stop_token_ids)
        self.scheduler.fits = self.runner.cache.fits  # admission within the KV cache's budget
        self.scheduler.match_prompt = self.runner.match_prompt  # prompt beginnings already computed
        self._subs: dict[str, _Subscriber] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # outputs of this phase, by event loop
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        # work that must run on the model's thread between steps (e.g. preloading a prompt set)
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        # CPU: fewer threads while other processes compete for the cores (app/engine/threads.py)
        self.threads = ThreadGovernor(torch.get_num_threads()) \
            if config.adaptive_threads and loaded.device.type == "cpu" and torch.get_num_threads() > 1 else None
        self.steps = 0
        self.step_seconds = 0.0  # time spent running the model, for the metrics and benchmarks
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the model loop on a background thread (tests, embedding). `promptserve serve` instead runs
        it on the main thread with run_forever(), where the model was loaded and the cache allocated:
        on CPU, decode steps ran about 1.5x slower when another live thread had run torch kernels first."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="promptserve-engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Run the model loop on the calling thread until stop()."""
        self._loop()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def warmup(self) -> None:
        """One short generation so the first real request does not pay for lazy initialisation."""
        ids = self.tokenizer.encode("Hello")
        async for _ in self.generate(EngineRequest(ids, SamplingParams(max_tokens=2, ignore_eos=True))):
            pass
        self.ready = True

    # -- requests --------------------------------------------------------------------------------
    def check_length(self, prompt_len: int, prompt_set: PromptSetRef | None, max_tokens: int) -> None:
        prefix = prompt_set.num_virtual_tokens if prompt_set else 0
        total = prefix + prompt_len + max_tokens
        if prompt_len < 1:
            raise RequestTooLong("the prompt is empty")
        if total > self.max_model_len:
            # OpenAI's wording: client libraries (LiteLLM's ContextWindowExceededError) recognise it
            raise RequestTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({prefix} virtual tokens of the prompt set, {prompt_len} in the prompt, "
                f"{max_tokens} for the completion): the request exceeds the context. Please reduce the length "
                f"of the prompt or max_tokens.")

    def submit(self, request: EngineRequest, request_id: str | None = None) -> tuple[str, asyncio.Queue]:
        """Queue a request from an event loop; its outputs arrive on the returned asyncio queue."""
        sampling = request.sampling
        self.check_length(len(request.prompt_token_ids), request.prompt_set,
                          sampling.max_tokens if request.mode == Mode.GENERATE else 0)
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise InvalidEngineRequest(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        outside = [t for t, _ in sampling.logit_bias if not 0 <= t < vocab]
        if outside:  # OpenAI refuses them too; ignoring them would drop what the client asked for
            raise InvalidEngineRequest(f"logit_bias names token {outside[0]}, outside this model's vocabulary "
                                       f"(0..{vocab - 1})", param="logit_bias")
        request_id = request_id or uuid.uuid4().hex
        req = GenerationRequest(request_id, list(request.prompt_token_ids), sampling, request.prompt_set,
                                Mode(request.mode), request.tag_positions, request.constraint)
        sub = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(),
                          Detokenizer(self.tokenizer, sampling.stop))
        self._subs[request_id] = sub
        try:
            self.scheduler.add(Sequence(req))
        except QueueFull:
            self._subs.pop(request_id, None)
            raise
        self._wake.set()
        return request_id, sub.queue

    def preload(self, prompt_set: PromptSetRef) -> Future:
        """Make a prompt set's prefix device-resident (for an `input` set: run it through the model)
        between two steps, so the first request with it does not pay for that."""
        return self.call(lambda: self.runner.prefixes.get(prompt_set) and None)

    def preload_content(self, sha256: str, prompt_set) -> Future:
        """Make an uploaded prompt set resident under its content hash before it is stored."""
        return self.call(lambda: self.runner.prefixes.put(sha256, prompt_set) and None)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the model's thread between two steps; its result or exception arrives on the future.

        Every torch operation of the server belongs on that thread, not only the model's: on CPU the first
        torch op a thread runs gives it its own OpenMP team, and with a second team alive (an upload
        validated on a worker thread, say) decode steps ran 1.3-1.4x slower here (benchmarks/engine_steps.py).
        Calls made before the loop starts wait for it; after stop() they fail at once."""
        future: Future = Future()
        if threading.current_thread() is self._loop_thread:  # called from a step: waiting would deadlock
            _settle(future, fn)
            return future
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine is stopped"))
            return future
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                _settle(future, fn)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._wake.set()

    async def generate(self, request: EngineRequest, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (disconnect, timeout) aborts it."""
        request_id, queue = self.submit(request, request_id)
        finished = False
        try:
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        self._loop_thread = threading.current_thread()
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                self._run_calls()
                self._flush()
                if not self.scheduler.has_work():
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > CACHE_SHRINK_AFTER_IDLE_S:  # not between a burst's requests
                        self.runner.cache.shrink_if_idle()
                    if self.threads is not None:
                        self.threads.idle()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                idle_since = None
                if self.threads is not None:
                    self.threads.between_steps()
                try:
                    self.step()
                except Exception:  # never let one bad step kill the server or leave a caller waiting
                    log.exception("engine step failed")
                    try:
                        self._fail_in_flight("internal engine error")
                    except Exception:  # the loop must outlive its own clean-up failing, or every caller hangs
                        log.exception("failing the in-flight requests failed")
                self._flush()
        finally:
            self._run_calls()  # what was queued before the loop ended still gets its answer
            self._flush()

    def step(self) -> None:
        step = self.scheduler.schedule()
        for seq in step.aborted:  # the scheduler finished them already
            self._retire(seq)
        if step.empty:
            return
        # counted before any of its tokens go out: a caller holding its last token sees this step in stats()
        self.steps += 1
        # Prefill first, and its first tokens go out before the decode runs: a new request's time to first
        # token is then the step in flight plus its own prefill, not also a decode of the whole batch.
        if step.prefills:
            self._prefill(step.prefills)
            self._flush()  # new requests' first tokens go out now, not after the decode
        if step.decodes:
            self._decode(step.decodes)
        self._flush()

    def _timed(self, fn, *args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.step_seconds += time.perf_counter() - started

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill these sequences. When the forward pass fails, it is retried one sequence at a time,
        so only the sequence that fails on its own is failed (a request never fails for its neighbour)."""
        try:
            sampled, errors, results = self._timed(self.runner.prefill, seqs)
        except Exception as exc:
            if len(seqs) == 1:
                self._blame(seqs[0], exc)
                return
            log.exception("prefill of %d sequences failed; retrying them one by one", len(seqs))
            for seq in seqs:
                if seq.starts_row:  # rows of the failed attempt are rebuilt from scratch
                    self.runner.release(seq.request_id)
            for seq in seqs:
                self._prefill([seq])
            return
        self.scheduler.prefilled([s for s in seqs if s.request_id not in errors])
        for seq in seqs:
            if seq.request_id in errors:
                self._fail(seq, errors[seq.request_id])
            elif seq.request_id in results:  # a head request or prompt scoring: done after its prefill
                seq.result = results[seq.request_id]
                self._retire(seq, seq.result.get("finish_reason", FinishReason.STOP))
        self._advance(seqs, sampled)

    def _decode(self, seqs: list[Sequence]) -> None:
        """The next token (or tokens: speculation) of each running sequence. When the step fails, it is retried
        on each half of the batch, down to the single sequence that fails alone: log2(batch) extra steps, once."""
        try:
            sampled, errors = self._timed(self.runner.decode, seqs)
        except Exception as exc:
            if len(seqs) == 1:
                self._blame(seqs[0], exc)
                return
            log.exception("decode of %d sequences failed; retrying each half", len(seqs))
            half = len(seqs) // 2
            for part in (seqs[:half], seqs[half:]):
                part = [s for s in part if s.status is SeqStatus.RUNNING]  # the first half may have ended some
                if part:
                    self._decode(part)
            return
        for seq in seqs:
            if seq.request_id in errors:
                self._fail(seq, errors[seq.request_id])
        self._advance(seqs, sampled)

    def _blame(self, seq: Sequence, exc: Exception) -> None:
        log.error("request %s fails alone: %s: %s", seq.request_id, type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        self._fail(seq, EngineError(_failure_message(exc)))

    def _fail(self, seq: Sequence, error: EngineError) -> None:
        seq.error_kind = error.kind
        self._retire(seq, FinishReason.ERROR, error.message)

    def _advance(self, seqs: list[Sequence], sampled: dict[str, list[int]]) -> None:
        """Append the sampled tokens, stream them, and retire the sequences that finished."""
        finished = self.scheduler.update_from_output(sampled)
        done = {s.request_id for s in finished}
        for seq in seqs:
            if seq.request_id in sampled and seq.request_id not in done:
                try:
                    self._emit_progress(seq)
                except Exception as exc:  # e.g. detokenizing its text: that request alone fails
                    self._blame(seq, exc)
        for seq in finished:  # the scheduler finished them (a stop token, max_tokens)
            self._retire(seq)

    def cancel_all(self, message: str) -> Future:
        """Fail every request, running or waiting, as unavailable (the drain's end): between two steps."""
        return self.call(lambda: self._fail_in_flight(message, ErrorKind.UNAVAILABLE))

    def _fail_in_flight(self, message: str, kind: str = ErrorKind.INTERNAL) -> None:
        partial = [self.scheduler.partial] if self.scheduler.partial is not None else []
        for seq in list(self.scheduler.running) + partial:
            self.scheduler.finish(seq, FinishReason.ERROR, message)
            self.runner.release(seq.request_id)
        for request_id in list(self._subs):
            sub = self._subs.pop(request_id)
            self.scheduler.abort(request_id)  # drops it from the waiting queue, if it is there
            self._put(sub, RequestOutput(request_id, finished=True, finish_reason=FinishReason.ERROR, error=message,
                                         error_kind=kind))

    def _emit_progress(self, seq: Sequence) -> None:
        sub = self._subs.get(seq.request_id)
        if sub is None:
            return
        text, new, logprobs = self._detokenize_new(seq, sub, final=False)
        constraint = seq.request.constraint
        grammar_done = constraint is not None and constraint.finished and not sub.detok.stopped
        if grammar_done:  # nothing can follow: what was held back (a possible stop-string start) goes out
            text += sub.detok.step([], final=True)
        if sub.detok.stopped or grammar_done:
            # a stop string completed, or the output's grammar is complete: the sequence ends here
            self._put(sub, RequestOutput(seq.request_id, text, new, logprobs=logprobs))
            self._retire(seq, FinishReason.STOP, already_detokenized=True)
            return
        self._put(sub, RequestOutput(seq.request_id, text, new, prompt_tokens=len(seq.request.prompt_token_ids),
                                     completion_tokens=len(seq.output_ids), logprobs=logprobs))

    @staticmethod
    def _detokenize_new(seq: Sequence, sub: _Subscriber, final: bool) -> tuple[str, list[int], list | None]:
        """The text, tokens and log-probabilities of what the last step appended (several tokens after a
        speculative check), fed to the detokenizer one token at a time as steps of their own would feed
        them: when a stop string completes at one of them, the output ends there and the tokens after it
        are taken off the sequence, as if never generated. final: the sequence ends with these tokens."""
        n = seq.num_new_tokens
        new = seq.output_ids[len(seq.output_ids) - n:] if n else []
        if not new:
            return sub.detok.step([], final=final), [], None
        parts = []
        for j, token in enumerate(new):
            parts.append(sub.detok.step([token], final=final and j == n - 1))
            if sub.detok.stopped and j < n - 1:
                del seq.output_ids[len(seq.output_ids) - (n - 1 - j):]
                new = new[:j + 1]
                seq.num_new_tokens = len(new)
                break
        logprobs = seq.new_logprobs[:len(new)] if seq.new_logprobs is not None else None
        return "".join(parts), new, logprobs

    def _retire(self, seq: Sequence, reason: str | None = None, error: str | None = None,
                already_detokenized: bool = False) -> None:
        """The one place a request ends: finished in the scheduler (unless it finished it itself: reason
        None), its cache row and sampling state freed, its final output sent."""
        if reason is not None:
            self.scheduler.finish(seq, reason, error)
        self.runner.release(seq.request_id)
        self._emit_final(seq, already_detokenized)

    def _emit_final(self, seq: Sequence, already_detokenized: bool = False) -> None:
        sub = self._subs.pop(seq.request_id, None)
        if sub is None:
            return
        text, new, logprobs = "", [], None
        if not already_detokenized and seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and seq.output_ids:
            try:
                text, new, logprobs = self._detokenize_new(seq, sub, final=True)
            except Exception as exc:  # the subscriber is already taken off: answer it with the error
                log.exception("detokenizing the end of %s failed", seq.request_id)
                text, new, logprobs = "", [], None
                seq.finish_reason, seq.error_kind = FinishReason.ERROR, ErrorKind.INTERNAL
                seq.error = _failure_message(exc)
            if sub.detok.stopped:  # one of the last tokens completed a stop string
                seq.finish_reason = FinishReason.STOP
        self._put(sub, RequestOutput(seq.request_id, text, new, finished=True, finish_reason=seq.finish_reason,
                                     prompt_tokens=len(seq.request.prompt_token_ids),
                                     completion_tokens=len(seq.output_ids), error=seq.error,
                                     error_kind=seq.error_kind, scores=(seq.result or {}).get("scores"),
                                     tag_logprobs=(seq.result or {}).get("tag_logprobs"), logprobs=logprobs,
                                     prompt_logprobs=seq.prompt_logprobs))

    def _put(self, sub: _Subscriber, out: RequestOutput) -> None:
        """Queue an output for its caller; _flush() hands a phase's outputs over, one wake-up per event loop
        (64 streams cost one cross-thread call a step, not 64)."""
        self._outbox.setdefault(sub.loop, []).append((sub.queue, out))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # its event loop is closed (the server is exiting): nobody is listening
                pass

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes and emits: 0..vocab_size-1."""
        return self.runner.forward.vocab_size

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self.loaded.stop_token_ids

    def stats(self) -> EngineStats:
        """What the metrics read, without reaching into the runner (safe from any thread: plain reads)."""
        prefixes = self.runner.prefixes
        return EngineStats(steps=self.steps, busy_seconds=self.step_seconds, waiting=self.num_waiting,
                           running=self.num_running, prefix_hits=prefixes.hits, prefix_misses=prefixes.misses,
                           prefixes_resident=len(prefixes),
                           threads=self.threads.threads if self.threads is not None else torch.get_num_threads(),
                           kv_cache_bytes=self.runner.cache.allocated_bytes,
                           kv_cache_budget_bytes=self.runner.cache.budget_bytes,
                           prompt_cache_prompt_tokens=self.runner.prompts.prompt_tokens,
                           prompt_cache_hit_tokens=self.runner.prompts.hit_tokens,
                           prompt_cache_bytes=self.runner.prompts.resident_bytes(),
                           speculative_draft_tokens=self.runner.draft_tokens,
                           speculative_accepted_tokens=self.runner.accepted_draft_tokens)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting
