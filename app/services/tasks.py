"""Tasks: resolve a task name to its active prompt set, encode prompts, run generation, take uploads."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import lru_cache
from typing import AsyncIterator, Callable, TypeVar

from app.engine.constraints import Constraint, ConstraintSpec, GrammarLimits, Grammars, InvalidConstraint
from app.engine.engine import Engine, InvalidEngineRequest, QueueFull, RequestTooLong
from app.engine.types import EngineRequest, ErrorKind, Mode, PromptSetRef, RequestOutput, SamplingParams, TokenLogprob
from app.model.spec import ModelSpec
from app.services.errors import (
    Conflict,
    GenerationFailed,
    IdempotencyKeyReused,
    InvalidPromptSet,
    InvalidRequest,
    NotFound,
    Overloaded,
    ServiceError,
    Unavailable,
)
from app.task_types.encoding import (
    MAX_TEXT_TOKENS,
    TextTooLong,
    best_bio_path,
    bio_tags,
    classify_ids,
    decode_entities,
    extract_encoding,
)
from prompt_store import PromptSetError, PromptSetMeta, PromptStore, StoreError, TaskNotFound, VersionInfo
from prompt_store import format as psf
from prompt_store.object_store import StoreUnavailable
from prompt_store.store import ActiveVersion, IdempotencyConflict, VersionNotFound, sha256_of, validate_task_name

log = logging.getLogger(__name__)
T = TypeVar("T")


def _store_may_be_down(method):
    """A store operation while the object store is unreachable: 503 with Retry-After, not a 500 (the file
    store never raises StoreUnavailable)."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except StoreUnavailable as exc:
            raise Unavailable(f"the prompt-set store is unavailable: {exc}", {"Retry-After": "2"},
                              code="store_unavailable") from None
    return wrapped


TOKENIZE_CONTEXTS = 4  # /tokenize counts up to this many contexts' worth of tokens
# a prompt set must leave at least this many positions of the context for the prompt and the answer
MIN_CONTEXT_ROOM = 16


@dataclass(frozen=True)
class ResolvedTask:
    name: str
    version: int | None  # None: the base model, no prompt set
    meta: PromptSetMeta | None
    ref: PromptSetRef | None

    @property
    def task_type(self) -> str:
        return self.meta.task_type if self.meta else "generate"


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None


class TaskService:
    engine_call_timeout = 60.0  # seconds an upload or activation waits for its tensor work on the engine

    def __init__(self, engine: Engine, store: PromptStore, spec: ModelSpec, tokenizer,
                 grammar_limits: GrammarLimits | None = None):
        self.engine = engine
        self.grammar_limits = grammar_limits or GrammarLimits()
        self.store = store
        self.spec = spec
        self.tokenizer = tokenizer
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self._tokenizer_files: dict[str, bytes] | None = None

    # -- tasks -----------------------------------------------------------------------------------
    @property
    def base_model_id(self) -> str:
        return self.spec.name

    @_store_may_be_down
    def resolve(self, task: str) -> ResolvedTask:
        if task == self.base_model_id:
            return ResolvedTask(task, None, None, None)
        try:
            info = self.store.resolve(task)
        except (TaskNotFound, VersionNotFound):
            raise NotFound(f"no task named {task!r}: the model {task!r} does not exist", param="model",
                           code="model_not_found") from None
        except (StoreError, PromptSetError) as exc:
            raise NotFound(f"task {task!r} cannot be served: {exc}") from None
        return ResolvedTask(task, info.version, info.meta, self._ref(info))

    @staticmethod
    def _ref(info: VersionInfo) -> PromptSetRef:
        return PromptSetRef(info.task, info.version, str(info.path), info.meta.num_virtual_tokens, info.sha256)

    def _preload(self, info: VersionInfo) -> VersionInfo:
        """Have the engine load a version that just became active before the admin gets the answer, so
        the first request after it runs at once. A failure here is logged, not raised: the version is
        stored and active, and a request would load it (and report any error) itself."""
        try:
            self.engine.preload(self._ref(info)).result(timeout=self.engine_call_timeout)
        except Exception as exc:
            log.warning("could not preload %s v%d: %s", info.task, info.version, exc)
        return info

    def _on_engine(self, fn: Callable[[], T]) -> T:
        """Run tensor work (parsing, validating, converting prompt sets) on the engine's thread and wait for
        it: torch on a second thread slows every decode step (see Engine.call). fn's errors propagate."""
        try:
            return self.engine.call(fn).result(timeout=self.engine_call_timeout)
        except FutureTimeout:
            raise Overloaded(f"the engine did not get to this within {self.engine_call_timeout:g} s",
                             {"Retry-After": "1"}) from None

    # -- prompts ---------------------------------------------------------------------------------
    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token of the vocabulary spells: a text of more than n times this many
        characters has more than n tokens, which is known without tokenizing it."""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max(1, max(len(p) for p in pieces if p is not None))

    def _refuse_beyond(self, chars: int, tokens: int, what: str) -> None:
        if chars > tokens * self.max_token_chars:
            raise InvalidRequest(f"{what} has {chars} characters, so more than {tokens} tokens: this model's maximum "
                                 f"context length is {self.engine.max_model_len} tokens",
                                 code="context_length_exceeded")

    @staticmethod
    def _chars(prompt: str | None, messages: list[dict] | None, tools: list[dict] | None = None) -> int:
        if messages is None:
            return len(prompt or "")
        return sum(len(m.get("content") or "") for m in messages) + len(str(tools or ""))

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of a chat (with tools offered, or tool calls in its history). A
        prompt whose characters alone exceed the context is refused before it is tokenized."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("give exactly one of 'prompt' or 'messages'")
        self._refuse_beyond(self._chars(prompt, messages, tools), self.engine.max_model_len, "the prompt")
        if messages is not None:
            if not messages:
                raise InvalidRequest("'messages' is empty")
            ids = self.tokenizer.encode(self._chat_text(messages, tools), add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        return ids

    def _chat_text(self, messages: list[dict], tools: list[dict] | None = None,
                   add_generation_prompt: bool = True) -> str:
        """The chat as prompt text: the model's chat template; with tools offered or tool calls in the history,
        its tool format when it has one, else the format of app/services/tools.py."""
        from app.services.tools import render_tool_chat  # tools only

        try:
            if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                return render_tool_chat(self.tokenizer, messages, tools or [])
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as exc:  # a template may reject role orders it does not support
            raise InvalidRequest(f"the chat template rejected these messages: {exc}") from None

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer as Hugging Face files (tokenizer.json, its config, the chat template), so a client
        (a benchmark, an evaluation harness) can load the very tokenizer this server uses."""
        if self._tokenizer_files is None:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:
                self.tokenizer.save_pretrained(tmp)
                self._tokenizer_files = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}
        return self._tokenizer_files

    def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool = True,
                 add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """Tokens of a text or chat of up to TOKENIZE_CONTEXTS contexts (a client counts a prompt a little
        too long, not a book): a longer one is refused, by its characters before any work when they say so."""
        cap = TOKENIZE_CONTEXTS * self.engine.max_model_len

        def too_many(has: str) -> InvalidRequest:
            return InvalidRequest(f"/tokenize counts at most {cap} tokens ({TOKENIZE_CONTEXTS} contexts); this text "
                                  f"has {has}", code="too_many_tokens")
        if self._chars(prompt, messages, tools) > cap * self.max_token_chars:
            raise too_many("more")
        if messages is not None:
            ids = self.tokenizer.encode(self._chat_text(messages, tools, add_generation_prompt),
                                        add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt or "", add_special_tokens=add_special_tokens)
        if len(ids) > cap:
            raise too_many(str(len(ids)))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        vocab = self.engine.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids must be in 0..{vocab - 1} (got {bad[0]})", param="tokens")
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        """One token as text, for log-probabilities (a token that is part of a character decodes to U+FFFD)."""
        return _decode_one(self.tokenizer, token_id)

    def constraint(self, spec: ConstraintSpec, param: str) -> Constraint:
        """A fresh matcher for a request's grammar (compiled grammars are cached). CPU work of the grammar
        engine, not torch: callers run it off the event loop."""
        with self._grammars_lock:  # requests arrive on several threads: one Grammars (one cache) for all
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.engine.vocab_size, self.engine.stop_token_ids,
                                          self.grammar_limits)
        try:
            return self._grammars.constraint(spec)
        except InvalidConstraint as exc:
            raise InvalidRequest(str(exc), param=param, code="invalid_grammar") from None

    def max_tokens_for(self, task: ResolvedTask, ids: list[int], requested: int | None, default: int) -> int:
        """An explicit max_tokens is kept (and checked against the context later); without one, generate
        up to the default, shortened to what the context has left."""
        if requested is not None:
            return requested
        room = self.engine.max_model_len - len(ids) - (task.ref.num_virtual_tokens if task.ref else 0)
        return max(1, min(default, room))

    # -- generation ------------------------------------------------------------------------------
    def stream(self, task: ResolvedTask, ids: list[int], sampling: SamplingParams, *, request_id: str | None = None,
               mode: Mode = Mode.GENERATE, tag_positions: list[int] | None = None,
               constraint: Constraint | None = None) -> AsyncIterator[RequestOutput]:
        """The engine refuses a request (too long, queue full) when its first output is awaited, so callers
        that must answer with a status (streaming) await that first output before responding."""
        return self._stream(EngineRequest(ids, sampling, task.ref, mode, tag_positions, constraint), request_id)

    async def _stream(self, request: EngineRequest, request_id: str | None):
        try:
            gen = self.engine.generate(request, request_id)
            first = await gen.__anext__()
        except RequestTooLong as exc:
            raise InvalidRequest(str(exc), code="context_length_exceeded") from None
        except InvalidEngineRequest as exc:
            raise InvalidRequest(str(exc), param=exc.param) from None
        except QueueFull as exc:
            raise Overloaded(f"server busy: {exc}", {"Retry-After": "1"}) from None
        try:
            out = first
            while True:
                if out.finished and out.finish_reason == "error":
                    raise engine_failure(out)
                yield out
                if out.finished:
                    return
                out = await gen.__anext__()
        finally:
            await gen.aclose()

    async def complete(self, task: ResolvedTask, ids: list[int], sampling: SamplingParams,
                       request_id: str | None = None, constraint: Constraint | None = None) -> Completion:
        start = time.monotonic()
        parts, tokens, first = [], [], None
        logprobs = [] if sampling.logprobs is not None else None
        final = None
        async for out in self.stream(task, ids, sampling, request_id=request_id, constraint=constraint):
            if first is None and out.token_ids:
                first = time.monotonic() - start
            parts.append(out.text)
            tokens.extend(out.token_ids)
            if logprobs is not None and out.logprobs:
                logprobs.extend(out.logprobs)
            final = out
        return Completion("".join(parts), final.finish_reason, final.prompt_tokens, final.completion_tokens,
                          tokens, first, logprobs, final.prompt_logprobs)

    # -- classify / extract: one forward pass each -------------------------------------------------
    async def _run_head(self, task: ResolvedTask, ids: list[int], mode: Mode, positions=None):
        final = None
        async for out in self.stream(task, ids, SamplingParams(max_tokens=1), mode=mode, tag_positions=positions):
            final = out
        return final

    def _encode_texts(self, task: ResolvedTask, texts: list[str]) -> list:
        """Every text's encoding, or a refusal naming the first that is longer than a task reads -- before
        any runs, and before tokenizing one whose characters alone say it is too long."""
        encode = classify_ids if task.task_type == "classify" else extract_encoding
        limit = MAX_TEXT_TOKENS * self.max_token_chars
        for i, text in enumerate(texts):
            if len(text) > limit:
                raise InvalidRequest(f"{_which_text(i, len(texts))} has {len(text)} characters, more than the "
                                     f"{MAX_TEXT_TOKENS} tokens a {task.task_type} task reads",
                                     code="context_length_exceeded")
        out = []
        for i, text in enumerate(texts):
            try:
                out.append(encode(self.tokenizer, text, refuse_longer=True))
            except TextTooLong as exc:
                raise InvalidRequest(f"{_which_text(i, len(texts))}: {exc}", code="context_length_exceeded") from None
        return out

    async def _classify(self, task: ResolvedTask, text: str, ids: list[int]) -> dict:
        out = await self._run_head(task, ids, Mode.CLASSIFY)
        scores = dict(zip(task.meta.labels, out.scores))
        return {"label": max(scores, key=scores.get), "scores": scores,
                "usage": {"prompt_tokens": out.prompt_tokens}}

    async def _extract(self, task: ResolvedTask, text: str, enc) -> dict:
        if not enc.positions:  # nothing to tag (blank text): no model call needed
            return {"entities": [], "usage": {"prompt_tokens": 0}}
        out = await self._run_head(task, enc.ids, Mode.TAG, enc.positions)
        tags = bio_tags(task.meta.labels)
        entities = decode_entities(text, enc, best_bio_path(out.tag_logprobs, tags), tags)
        return {"entities": entities, "usage": {"prompt_tokens": out.prompt_tokens}}

    async def label(self, task: ResolvedTask, texts: list[str]) -> list[dict]:
        """Classify or extract each text, in order; submitted together, so the engine runs them in the same
        forward passes."""
        if task.meta is None or task.task_type not in ("classify", "extract"):
            raise InvalidRequest(f"task {task.name!r} is a {task.task_type} task: send 'prompt' or 'messages'")
        encoded = await asyncio.to_thread(self._encode_texts, task, texts)  # off the caller's event loop
        run = self._classify if task.task_type == "classify" else self._extract
        return list(await asyncio.gather(*(run(task, text, enc) for text, enc in zip(texts, encoded))))

    # -- listing and admin ------------------------------------------------------------------------
    @_store_may_be_down
    def list_tasks(self) -> list[VersionInfo]:
        out = []
        for task in self.store.tasks():
            try:
                out.append(self.store.resolve(task))
            except (StoreError, PromptSetError):
                continue  # deleted between listing and reading: not a task any more
        return out

    @_store_may_be_down
    def versions(self, task: str) -> list[VersionInfo]:
        try:
            return self.store.list_versions(task)
        except (TaskNotFound, StoreError) as exc:
            raise NotFound(str(exc)) from None

    @_store_may_be_down
    def activate(self, task: str, version: int) -> VersionInfo:
        try:
            info = self.store.activate(task, version)
        except (TaskNotFound, VersionNotFound) as exc:
            raise NotFound(str(exc)) from None
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None
        return self._preload(info)

    @_store_may_be_down
    def delete_version(self, task: str, version: int) -> None:
        try:
            self.store.delete_version(task, version)
        except (TaskNotFound, VersionNotFound) as exc:
            raise NotFound(str(exc)) from None
        except ActiveVersion as exc:  # refuse rather than leave the task without one
            raise Conflict(str(exc)) from None
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None

    @_store_may_be_down
    def delete_task(self, task: str) -> None:
        try:
            self.store.delete_task(task)
        except (TaskNotFound, StoreError) as exc:
            raise NotFound(str(exc)) from None

    def upload_peft_zip(self, task: str, data: bytes, task_type: str = "generate",
                        idempotency_key: str | None = None) -> VersionInfo:
        """A zipped Hugging Face PEFT adapter directory -> prompt set -> the task's next version."""
        converted = self._on_engine(lambda: peft_zip_to_prompt_set(data, self.spec, task_type))
        return self.upload(task, converted, idempotency_key)

    # -- uploads ---------------------------------------------------------------------------------
    @_store_may_be_down
    def upload(self, task: str, data: bytes, idempotency_key: str | None = None) -> VersionInfo:
        """Validate prompt-set bytes against this model, make them device-resident, then store them as the
        task's next active version (or return the stored one: see PromptStore.put).

        Validation comes first and the store's writes are atomic, so a bad file never changes anything.
        The prefix is built before the store write, keyed by content, so the version is servable at once
        when it becomes active, and the answer of the last upload to complete names the active version."""
        if task == self.base_model_id:
            raise Conflict(f"{task!r} is the base model's own id and cannot be a task name")
        try:
            validate_task_name(task)
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None
        self._refuse_case_twin(task)
        sha = sha256_of(data)
        ps = self._on_engine(lambda: self._validate(data))
        try:
            self.engine.preload_content(sha, ps).result(timeout=self.engine_call_timeout)
        except Exception as exc:  # a request would load it (and report any error) itself
            log.warning("could not preload the upload to %s: %s", task, exc)
        try:
            return self.store.put(task, data, idempotency_key=idempotency_key)
        except IdempotencyConflict as exc:
            raise IdempotencyKeyReused(str(exc)) from None
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None

    def _refuse_case_twin(self, task: str) -> None:
        """A new task whose name differs from an existing one only in case (`CHAT` beside `chat`) is refused:
        clients, dashboards and case-insensitive file systems would confuse them."""
        existing = self.store.tasks()
        if task in existing:
            return
        twin = next((t for t in existing if t.casefold() == task.casefold()), None)
        if twin is not None:
            raise Conflict(f"a task named {twin!r} exists; task names may not differ only in case")

    def _validate(self, data: bytes) -> psf.PromptSet:
        try:
            ps = psf.parse_for_model(data, self.spec)
        except PromptSetError as exc:
            raise InvalidPromptSet(str(exc)) from None
        room = self.engine.max_model_len - ps.meta.num_virtual_tokens
        if room < MIN_CONTEXT_ROOM:
            raise InvalidPromptSet(
                f"{ps.meta.num_virtual_tokens} virtual tokens leave {max(room, 0)} of this server's "
                f"{self.engine.max_model_len}-token context for the prompt and the answer; at most "
                f"{self.engine.max_model_len - MIN_CONTEXT_ROOM} virtual tokens fit")
        return ps


def _which_text(index: int, count: int) -> str:
    return f"text {index}" if count > 1 else "the text"


@lru_cache(maxsize=65536)
def _decode_one(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def engine_failure(out: RequestOutput) -> ServiceError:
    """The service error for a request the engine failed (alone: its neighbours are unaffected)."""
    message = out.error or "generation failed"
    if out.error_kind == ErrorKind.INVALID:
        return InvalidRequest(message)
    if out.error_kind == ErrorKind.GRAMMAR:
        return InvalidRequest(message, code="invalid_grammar")
    if out.error_kind == ErrorKind.UNAVAILABLE:
        return Unavailable(f"{message}; retry the request", {"Retry-After": "1"})
    return GenerationFailed(message)


def peft_zip_to_prompt_set(data: bytes, spec: ModelSpec, task_type: str) -> bytes:
    """A zipped PEFT adapter directory -> prompt-set bytes. Any defect of the archive or the adapter is
    the uploader's (InvalidPromptSet), whatever the decoder raised for it."""
    import io
    import tempfile
    import zipfile
    from pathlib import Path

    from prompt_store.peft_import import import_peft

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        configs = [n for n in archive.namelist() if n.endswith("adapter_config.json")]
    except Exception as exc:
        raise InvalidPromptSet(f"not a valid zip archive: {exc}") from None
    if len(configs) != 1:
        raise InvalidPromptSet("the zip must hold exactly one PEFT adapter (one adapter_config.json)")
    root = configs[0][: -len("adapter_config.json")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            try:
                entry = archive.getinfo(root + name)
            except KeyError:
                raise InvalidPromptSet(f"the adapter lacks {name}") from None
            # checked before decompressing, so a zip bomb is refused without being expanded
            if entry.file_size > 512 * 1024 * 1024:
                raise InvalidPromptSet(f"{name} is too large ({entry.file_size} bytes uncompressed)")
            try:
                (Path(tmp) / name).write_bytes(archive.read(entry))
            except Exception as exc:  # bad CRC, truncated or encrypted entry, unknown compression
                raise InvalidPromptSet(f"cannot read {name} from the zip: {exc}") from None
        try:
            return import_peft(tmp, spec, spec.name, task_type=task_type).to_bytes(spec)
        except Exception as exc:
            raise InvalidPromptSet(f"cannot import the PEFT adapter: {type(exc).__name__}: {exc}") from None
