"""Iteration-level (continuous) batching, testable without a model.

Each engine step calls ``schedule()`` (apply aborts, admit waiting requests into free batch rows, decode
the rest), runs the model, then ``prefilled()`` and ``update_from_output()`` with the sampled tokens.
A step prefills at most ``max_prefill_tokens`` (padded) prompt tokens, so a burst of prompts or one long
prompt (in chunks) cannot stall the running streams for longer than that.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Callable

from app.engine.types import FinishReason, Mode, SchedulerOutput, SeqStatus, Sequence

if TYPE_CHECKING:
    from app.engine.prompt_cache import CachedPrompt


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, max_num_seqs: int, max_queue: int, max_prefills_per_step: int = 16,
                 stop_token_ids: frozenset[int] = frozenset(), max_prefill_tokens: int = 1024,
                 fits: Callable[[int, int], bool] | None = None,
                 match_prompt: Callable[[Sequence], CachedPrompt | None] | None = None):
        self.max_num_seqs = max_num_seqs
        # fits(rows, longest reservation): whether the KV cache's budget holds that many sequences (None: any
        # number up to max_num_seqs); a sequence waits, in order, until it does
        self.fits = fits
        # match_prompt(seq): the beginning of its prompt already computed (the prompt cache), or None; those
        # tokens count as computed from admission on, so the step's token budget holds only the rest
        self.match_prompt = match_prompt
        # prefills of one step run as one padded forward pass: bound its size by count and by tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.max_prefills_per_step = max_prefills_per_step
        self.stop_token_ids = stop_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.partial: Sequence | None = None  # a long prompt part-way through its chunked prefill
        self._pending_aborts: set[str] = set()
        self._lock = threading.Lock()  # add/abort come from other threads; schedule runs on the loop

    # -- called from any thread ------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} waiting)")
            self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.add(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.partial is not None)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.partial or self._pending_aborts)

    # -- called by the engine loop ---------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        with self._lock:
            aborts, self._pending_aborts = self._pending_aborts, set()
            if aborts:
                kept = deque()
                for seq in self.waiting:
                    (out.aborted if seq.request_id in aborts else kept).append(seq)
                self.waiting = kept
                if self.partial is not None and self.partial.request_id in aborts:
                    out.aborted.append(self.partial)
                    self.partial = None
            admitted = self._admit() if self.partial is None else []
        if aborts:
            still = []
            for seq in self.running:
                (out.aborted if seq.request_id in aborts else still).append(seq)
            self.running = still
        for seq in out.aborted:
            self._finish(seq, FinishReason.ABORT)
        out.decodes = list(self.running)
        if self.partial is not None:  # a long prompt goes on, one chunk a step; the queue waits behind it
            seq = self.partial
            seq.num_scheduled_tokens = min(seq.prompt_len - seq.num_computed_tokens, self.max_prefill_tokens)
            out.prefills = [seq]
            return out
        for seq in admitted:
            seq.status = SeqStatus.RUNNING
            seq.num_scheduled_tokens = seq.prompt_len - seq.num_computed_tokens  # the rest of it
            self.running.append(seq)
        out.prefills = admitted
        return out

    def _admit(self) -> list[Sequence]:
        """Prompts from the head of the queue, all of each but what the prompt cache holds of it, while the
        padded batch (longest x count) fits the step's token budget. A generate prompt over the budget on its
        own becomes the partial sequence, prefilled in chunks of the budget (it joins the running batch after
        its last chunk)."""
        admitted: list[Sequence] = []
        free = self.max_num_seqs - len(self.running)
        longest = 0
        reserved = max((s.reserved_len for s in self.running), default=0)
        while self.waiting and free > 0 and len(admitted) < self.max_prefills_per_step:
            nxt = self.waiting[0]
            if self.fits is not None and not self.fits(len(self.running) + len(admitted) + 1,
                                                       max(reserved, nxt.reserved_len)):
                break  # the KV cache's budget is spoken for: it waits until running sequences finish
            reserved = max(reserved, nxt.reserved_len)
            # asked only once the sequence has room: a queue held up by the budget is not hashed every step
            cached = self.match_prompt(nxt) if self.match_prompt is not None else None
            computed = cached.tokens if cached is not None else 0
            size = nxt.request.prefix_len + nxt.prompt_len - computed
            long_prompt = nxt.prompt_len - computed > self.max_prefill_tokens
            if not admitted and long_prompt and nxt.request.mode == Mode.GENERATE:
                self.partial = self.waiting.popleft()
                self.partial.status = SeqStatus.RUNNING
                self.partial.cached_prompt, self.partial.num_computed_tokens = cached, computed
                return []
            longest = max(longest, size)
            if admitted and longest * (len(admitted) + 1) > self.max_prefill_tokens:
                break  # the padded batch would be too large: the rest waits for the next step
            nxt.cached_prompt, nxt.num_computed_tokens = cached, computed
            admitted.append(self.waiting.popleft())
            free -= 1
        return admitted

    def prefilled(self, seqs: list[Sequence]) -> None:
        """The step ran these sequences' scheduled prompt tokens: they count as computed, and a partial
        sequence whose prompt is now all in the cache joins the running batch (before its first token is
        appended by update_from_output)."""
        for seq in seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            seq.cached_prompt = None  # copied into its row: the sequence no longer holds the cache's tensors
        seq = self.partial
        ran = seq is not None and any(s is seq for s in seqs)
        if ran and seq.num_computed_tokens >= seq.prompt_len and seq.status is SeqStatus.RUNNING:
            self.partial = None
            self.running.append(seq)

    def update_from_output(self, sampled: dict[str, list[int]]) -> list[Sequence]:
        """Append each sequence's new tokens (one, or several after a speculative check) in order, up to the
        one it finishes on (eos or length: any after it are dropped); return those that finished."""
        finished = []
        for seq in self.running:
            tokens = sampled.get(seq.request_id)
            if not tokens:
                continue
            params = seq.request.sampling
            seq.num_new_tokens = 0
            for token in tokens:
                seq.output_ids.append(token)
                seq.num_new_tokens += 1
                reason = params.ends_on(token, len(seq.output_ids), self.stop_token_ids)
                if reason is not None:
                    self._finish(seq, reason)
                    finished.append(seq)
                    break
        self.running = [s for s in self.running if s.status is not SeqStatus.FINISHED]
        return finished

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish a running sequence for a reason found outside the scheduler (stop string, error)."""
        self._finish(seq, reason, error)
        self.running = [s for s in self.running if s is not seq]
        if seq is self.partial:
            self.partial = None

    @staticmethod
    def _finish(seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error
