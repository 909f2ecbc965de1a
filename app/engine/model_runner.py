"""Runs the model for one scheduler step: prefill new sequences, decode running ones, sample.

Prompt sets enter in prefill only: their prefix is copied into the sequence's cache row, and from then
on the sequence decodes like any other, so one batch mixes tasks, kinds and prefix lengths freely.
"""

from __future__ import annotations

import logging

import torch

from app.engine import kernels
from app.engine.attention import CacheAttention, StepMetadata
from app.engine.kv_cache import KVCache
from app.engine.prefix_cache import PrefixCache
from app.engine.prompt_cache import CachedPrompt, PromptCache
from app.engine.sampling import RowState, Sampled, SamplingError, make_generator, sample, token_logprobs
from app.engine.speculation import NgramDrafter
from app.engine.types import EngineError, ErrorKind, FinishReason, Mode, Sequence
from app.model.forward import DecoderForward
from app.model.linear import linear_weight_bytes, packing_works
from prompt_store import format as psf

log = logging.getLogger(__name__)


def _sort_sampled(seqs: list[Sequence], tokens: list[list[Sampled] | SamplingError], sampled: dict,
                  errors: dict) -> None:
    """Each sequence's new tokens (one, or several after a speculative check) go to `sampled` (their
    log-probabilities, when asked for, onto the sequence); a row that could not be sampled fails its request
    alone."""
    for seq, chosen in zip(seqs, tokens):
        if isinstance(chosen, SamplingError):
            kind = ErrorKind.GRAMMAR if chosen.grammar else ErrorKind.INVALID
            errors[seq.request_id] = EngineError(str(chosen), kind)
        else:
            sampled[seq.request_id] = [c.token for c in chosen]
            seq.new_logprobs = [c.logprob for c in chosen] if seq.request.sampling.logprobs is not None else None


def _one_each(tokens: list[Sampled | SamplingError]) -> list[list[Sampled] | SamplingError]:
    """One sampled token per sequence as the list of its new tokens (a speculative check gives several)."""
    return [t if isinstance(t, SamplingError) else [t] for t in tokens]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, shape, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int, prefix_cache_size: int, prefix_cache_bytes: int = 1 << 30,
                 pack_weights: bool = True, kernel_cache_dir: str | None = None, release_model_weights: bool = False,
                 small_batch_copy_bytes: int = 1 << 30, kv_cache_bytes: int | None = None,
                 prompt_cache_bytes: int = 0, speculative_tokens: int = 0,
                 stop_token_ids: frozenset[int] = frozenset()):
        self.device = device
        native = kernels.load(kernel_cache_dir) if kernel_cache_dir is not None and device.type == "cpu" \
            else kernels.NativeKernels()
        # decode attention: the native CPU kernel when it builds here, else torch's SDPA with a mask
        self.decode_attention = native.decode_attention
        bf16 = dtype == torch.bfloat16  # float32 keeps torch's ops: bit-identical to the model's own modules
        # projections of 1-2 rows: the native kernel where the CPU has AVX-512 or AVX2, else oneDNN. The kernel
        # reads the plain weights, oneDNN its packed copy: both are held only while the plain copy is small enough
        # (SmolLM2's 0.27 GB: its single-client speed); a larger model keeps its weights once, packed. On CPUs
        # without AVX-512 BF16 the native bf16_linear takes every projection (oneDNN emulates bf16 there, at less
        # than half its float32 speed, and on AVX2 refuses to pack it and runs reference code, ~1 GFLOP/s on a
        # Zen 3 EPYC): weights held once, plain, no oneDNN packing needed, and no budget to keep
        any_rows = bf16 and pack_weights and native.bf16_linear is not None
        pack = pack_weights and (any_rows or packing_works(device, dtype))
        small = (native.bf16_linear if any_rows else native.small_batch_linear) if bf16 and pack \
            else None
        plain_bytes = linear_weight_bytes(model) if small is not None and not any_rows else 0
        if plain_bytes > small_batch_copy_bytes:
            log.info("linear weights of %.2f GB held once (packed): the small-batch kernel's plain copy is over "
                     "its budget of %.2f GB", plain_bytes / 1e9, small_batch_copy_bytes / 1e9)
            small = None
        self.forward = DecoderForward(model, pack_weights=pack, small_linear=small,
                                      add_rms_norm=native.add_rms_norm if bf16 else None,
                                      release_model_weights=release_model_weights,
                                      decode_layers=native.decode_layers if small is not None else None,
                                      small_any_rows=any_rows)
        # with the native attention, rotary and the cache write of decode and prefill tokens as one native op
        # (bit-identical to torch's); it turns whole heads only (no partial rotary factor)
        full_rotary = self.forward.rotary_dim == self.forward.head_dim
        self._rotary_cache_write = native.rotary_cache_write \
            if native.decode_attention is not None and full_rotary else None
        f = self.forward
        self.cache = KVCache(len(f.layers), max_num_seqs, f.num_kv_heads, max_model_len, f.head_dim,
                             dtype, device, kv_cache_bytes)
        self.prefixes = PrefixCache(f, shape, device, dtype, prefix_cache_size, prefix_cache_bytes)
        self.prompts = PromptCache(prompt_cache_bytes)
        self._generators: dict[str, torch.Generator | None] = {}
        self._positions = torch.arange(max_model_len, device=device)
        # speculative decoding (speculation.py): proposed tokens a sequence's decode step may check, where the
        # check is exact (forward.speculative_rows); each speculating sequence's n-gram index
        self.speculative_tokens = speculative_tokens if self.forward.speculative_rows > 1 else 0
        self.stop_token_ids = stop_token_ids
        self._drafters: dict[str, NgramDrafter] = {}
        self.draft_tokens = 0  # proposed tokens checked, and those the model chose too
        self.accepted_draft_tokens = 0

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> tuple[dict[str, list[int]], dict[str, EngineError], dict[str, dict]]:
        """Run newly admitted sequences. Returns ([first sampled token] per request id, error per request id
        that could not run, head results of classify/tag requests, which are done after their prefill)."""
        sampled: dict[str, list[int]] = {}
        errors: dict[str, EngineError] = {}
        results: dict[str, dict] = {}
        self._prefill(seqs, sampled, errors, results)
        return sampled, errors, results

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> tuple[dict[str, list[int]], dict[str, EngineError]]:
        """The next tokens of each of these running sequences: one, or with speculation the proposed tokens
        the model chose too and the one after them (all of them: one contiguous view of rows 0..n-1; a
        subset, when the engine retries a failed step: rows gathered, one token each)."""
        sampled, errors = {}, {}
        _sort_sampled(seqs, self._decode(seqs), sampled, errors)
        return sampled, errors

    def release(self, request_id: str) -> None:
        self.cache.release(request_id)
        self._generators.pop(request_id, None)
        self._drafters.pop(request_id, None)

    @staticmethod
    def _reuses_prompt(seq: Sequence) -> bool:
        """Whether a sequence may start from, and add to, the prompt cache: a generate request that needs
        nothing of its prompt's positions but their keys and values (no prompt log-probabilities; heads read
        the prompt's hidden states)."""
        req = seq.request
        return req.mode == Mode.GENERATE and req.sampling.prompt_logprobs is None and req.sampling.max_tokens > 0

    def match_prompt(self, seq: Sequence) -> CachedPrompt | None:
        """The beginning of this sequence's prompt already in the prompt cache (the scheduler asks at admission)."""
        if not self._reuses_prompt(seq):
            return None
        return self.prompts.match(seq.request.prompt_set_key, seq.request.prompt_token_ids)

    def _keep_prompt(self, seq: Sequence) -> None:
        """After the prompt's last chunk: its whole blocks go into the prompt cache for later prompts."""
        if not self._reuses_prompt(seq):
            return
        req = seq.request
        row, p = self.cache.row_of(req.request_id), req.prefix_len
        end = p + seq.prompt_len
        self.prompts.store(req.prompt_set_key, req.prompt_token_ids,
                           self.cache.k[:, row, :, p:end], self.cache.v[:, row, :, p:end])

    def _rows(self, seqs: list[Sequence]) -> list[RowState]:
        return [RowState(s.request.sampling, self._generators.get(s.request_id), s.request.prompt_token_ids,
                         s.output_ids, s.request.constraint) for s in seqs]

    @staticmethod
    def _share_identical(seqs: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, Sequence]]]:
        """(sequences to run, [(copy, its leader)]): a whole-prompt generate request with the same prompt
        set and tokens as an earlier one in this step (the n choices of one request, or the same prompt
        sent twice) takes the leader's cache row and hidden states instead of a forward row of its own."""
        leaders: list[Sequence] = []
        copies: list[tuple[Sequence, Sequence]] = []
        first: dict[tuple, Sequence] = {}
        for seq in seqs:
            req = seq.request
            if req.mode != "generate" or not seq.prefill_is_whole:
                leaders.append(seq)
                continue
            key = (req.prompt_set_key, tuple(req.prompt_token_ids))
            if key in first:
                copies.append((seq, first[key]))
            else:
                first[key] = seq
                leaders.append(seq)
        return leaders, copies

    def _score_prompt(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict (the first prompt token
        has none: nothing of the prompt comes before it)."""
        req = seq.request
        start, end = seq.prefill_range
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        targets = req.prompt_token_ids[start + 1:end + 1]  # position t predicts token t + 1
        if not targets:
            return
        logprobs = torch.log_softmax(self.forward.logits(hidden[:len(targets)]).float(), dim=-1)
        top = req.sampling.prompt_logprobs or 0
        seq.prompt_logprobs.extend(token_logprobs(logprobs[k], t, top) for k, t in enumerate(targets))

    def _prefill(self, seqs: list[Sequence], sampled: dict, errors: dict, results: dict) -> None:
        """Each sequence's chunk of its prompt (usually all of it), in one forward pass: right-padded to
        the longest, each row attending to its own prefix and tokens only. New rows are allocated
        consecutively, so the batch reads cache[r0:r0+B]; a chunked prompt (alone in its step, see the
        scheduler) lives in the staging row until its last chunk."""
        cache = self.cache
        if len(seqs) > 1 and not all(s.starts_row and s.prefill_ends_prompt for s in seqs):
            raise RuntimeError("a chunked prompt must be prefilled alone")
        leaders, copies = self._share_identical(seqs)
        ready = []
        starting = [s for s in seqs if s.starts_row]  # later chunks have their row already
        cache.ensure(cache.num_used + sum(s.prefill_ends_prompt for s in starting),
                     max([cache.longest_reserved] + [s.reserved_len for s in starting]))
        for seq in leaders + [c for c, _ in copies]:  # leaders' rows first: the forward reads them contiguously
            req = seq.request
            if not seq.starts_row:  # a later chunk: the prefix and the prompt so far are in the row
                ready.append((seq, cache.row_of(req.request_id), None))
                continue
            try:
                prefix = self.prefixes.get(req.prompt_set) if req.prompt_set is not None else None
            except psf.PromptSetError as exc:  # deleted or changed since the request resolved it
                log.warning("prefill of %s failed: %s", req.request_id, exc)
                errors[req.request_id] = EngineError(str(exc), ErrorKind.UNAVAILABLE)
                continue
            staged = not seq.prefill_ends_prompt
            row = cache.allocate_staging(req.request_id, seq.reserved_len) if staged else \
                cache.allocate(req.request_id, seq.reserved_len)
            if prefix is not None and seq in leaders:
                cache.write_prefix(row, prefix.keys, prefix.values)
            if self._reuses_prompt(seq):
                self.prompts.prompt_tokens += seq.prompt_len
            if seq.cached_prompt is not None:  # the prompt's beginning, computed by an earlier request
                cache.write_positions(row, req.prefix_len, seq.cached_prompt.keys, seq.cached_prompt.values)
                self.prompts.hit_tokens += seq.cached_prompt.tokens
            ready.append((seq, row, prefix))
        copy_of = {id(copy): leader for copy, leader in copies}
        runs = [r for r in ready if id(r[0]) not in copy_of]
        shared = []
        for entry in ready:
            leader = copy_of.get(id(entry[0]))
            if leader is None:
                continue
            if leader.request_id in errors:  # its prompt set went away: the copy fails the same way
                errors[entry[0].request_id] = errors[leader.request_id]
            else:
                shared.append(entry)
        if not runs:
            return
        ready = runs + shared
        b = len(runs)
        r0 = runs[0][1]
        starts = torch.tensor([cache.length(row) for _, row, _ in runs], device=self.device)
        chunks = [seq.request.prompt_token_ids[slice(*seq.prefill_range)] for seq, _, _ in runs]
        lens = [len(c) for c in chunks]
        t = max(lens)
        ids = torch.zeros((b, t), dtype=torch.long, device=self.device)
        for k, chunk in enumerate(chunks):
            ids[k, :lens[k]] = torch.tensor(chunk, device=self.device)
        positions = starts.unsqueeze(1) + self._positions[:t].unsqueeze(0)  # [B, T]
        f = self.forward
        meta, packed = self._prepare_prefill(r0, starts, lens, positions)
        attention = self._attention(meta)
        hidden = f.hidden(f.embed(ids), positions, attention.attend, packed, attend_joined=attention.joined)
        # the shared copies: their leader's cache row and hidden states, no forward of their own
        source = {id(seq): k for k, (seq, _, _) in enumerate(runs)}
        for seq, row, _ in shared:
            k = source[id(copy_of[id(seq)])]
            length = int(starts[k]) + lens[k]
            cache.k[:, row, :, :length] = cache.k[:, r0 + k, :, :length]
            cache.v[:, row, :, :length] = cache.v[:, r0 + k, :, :length]
            source[id(seq)] = k
        generate = []
        for seq, row, prefix in ready:
            k = source[id(seq)]
            req = seq.request
            cache.set_length(row, int(starts[k]) + lens[k])
            if req.sampling.prompt_logprobs is not None:
                self._score_prompt(seq, hidden[k, :lens[k]])
            if not seq.prefill_ends_prompt:
                continue  # more chunks to come: nothing to sample yet
            if row == cache.staging_row:
                cache.commit_staging()
            self._keep_prompt(seq)
            if req.mode == Mode.GENERATE and req.sampling.max_tokens == 0:  # scoring the prompt only
                results[req.request_id] = {"finish_reason": FinishReason.LENGTH}
                continue
            if req.mode == Mode.GENERATE:
                generate.append((seq, k))
                continue
            try:
                results[req.request_id] = self._apply_head(req, prefix, hidden[k, :lens[k]])
            except Exception as exc:
                errors[req.request_id] = EngineError(str(exc), ErrorKind.INVALID)
        for seq, _, _ in ready:  # head requests (and prompt scoring) are done after their forward pass
            if seq.request_id in results or seq.request.mode != "generate":
                self.release(seq.request_id)
        if generate:
            chosen = [seq for seq, _ in generate]
            for seq in chosen:
                self._generators[seq.request_id] = make_generator(seq.request.sampling, self.device)
            last = hidden[[k for _, k in generate], [lens[k] - 1 for _, k in generate]]
            _sort_sampled(chosen, _one_each(sample(self.forward.logits(last), self._rows(chosen))), sampled, errors)

    @staticmethod
    def _apply_head(req, prefix, hidden: torch.Tensor) -> dict:
        if prefix is None or prefix.head_weight is None:
            raise ValueError(f"a {req.mode} request needs a prompt set with a head")
        rows = hidden[-1:] if req.mode == Mode.CLASSIFY else hidden[req.tag_positions or []]
        logits = rows.float() @ prefix.head_weight.T
        if prefix.head_bias is not None:
            logits = logits + prefix.head_bias
        if req.mode == Mode.CLASSIFY:
            return {"scores": torch.softmax(logits[0], -1).tolist()}
        # every tag's log-probability per word: the caller picks the best valid tag sequence (BIO rules)
        return {"tag_logprobs": torch.log_softmax(logits, -1).tolist()}

    # -- attention metadata: what a pass reads and writes, decided before it runs -------------------------
    def _attention(self, meta: StepMetadata) -> CacheAttention:
        return CacheAttention(self.cache, self.forward, meta, self.decode_attention, self._rotary_cache_write,
                              self._write_kv)

    def _write_kv(self, layer: int, rows: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values k, v [B, KVH, T, D] at cache rows and positions [B, T] (torch's path)."""
        self.cache.k[layer][rows, :, at] = k.transpose(1, 2)
        self.cache.v[layer][rows, :, at] = v.transpose(1, 2)

    def _prepare_prefill(self, r0: int, starts: torch.Tensor, lens: list[int], positions: torch.Tensor
                         ) -> tuple[StepMetadata, torch.Tensor | None]:
        """Rows r0..r0+B-1 run chunks of lens tokens from starts (right-padded to T, positions [B, T]). Also
        the real tokens' indices in the flattened [B*T] when some rows are padded (None when none is)."""
        cache = self.cache
        b, t = positions.shape
        # pads write past their row's valid length (clamped into the buffer); nothing ever reads them
        write_at = positions.clamp(max=cache.length_capacity - 1)
        width = int(max(int(st) + n for st, n in zip(starts.tolist(), lens)))
        row_index = torch.arange(r0, r0 + b, device=self.device).unsqueeze(1).expand(b, t)
        packed = (self._positions[:t].unsqueeze(0) < torch.tensor(lens, device=self.device).unsqueeze(1)) \
            .reshape(-1).nonzero().squeeze(1) if min(lens) < t else None
        meta = StepMetadata(start=r0, count=b, width=width, write_rows=row_index, write_at=write_at)
        if self._rotary_cache_write is not None:
            # the real tokens only: rotary and the cache write in one native op, then each token attends to its
            # own row up to its own position (no pads, no mask)
            token_rows, token_at = row_index.reshape(-1), write_at.reshape(-1)
            token_in_batch = token_rows - r0
            if packed is not None:
                token_rows, token_at, token_in_batch = token_rows[packed], token_at[packed], token_in_batch[packed]
            meta.token_rows, meta.token_at, meta.token_in_batch = (token_rows.contiguous(), token_at.contiguous(),
                                                                   token_in_batch.contiguous())
        else:
            # query t of row b (cache index starts[b] + t) sees every index up to and including its own
            allowed = self._positions[:width].view(1, 1, -1) <= positions.unsqueeze(2)  # [B, T, W]
            meta.mask = self.forward.group_mask(allowed, cache.k.dtype)
        return meta, packed

    def _prepare_decode(self, rows: list[int], lengths: torch.Tensor) -> StepMetadata:
        """One new token for each of these rows (ascending), at its row's length. A full decode runs rows
        0..n-1 and reads one contiguous view; a retry of part of a failed step gathers its rows (rare)."""
        n = len(rows)
        row_index = torch.tensor(rows, device=self.device)
        width = int(lengths.max()) + 1
        meta = StepMetadata(start=0, count=n, width=width, write_rows=row_index.unsqueeze(1),
                            write_at=lengths.unsqueeze(1), gather=None if rows == list(range(n)) else row_index,
                            token_rows=row_index, token_at=lengths)
        if self.decode_attention is None:
            allowed = (self._positions[:width].unsqueeze(0) <= lengths.unsqueeze(1)).unsqueeze(1)  # [n, 1, S]
            meta.mask = self.forward.group_mask(allowed, self.cache.k.dtype)
        return meta

    def _decode(self, seqs: list[Sequence]) -> list[list[Sampled] | SamplingError]:
        cache = self.cache
        n = len(seqs)
        rows = [cache.row_of(s.request_id) for s in seqs]
        # A full decode runs rows 0..n-1 in row order (seqs is the same set in scheduler order; sequences
        # prefilled in this step were given the rows after these), so it reads one contiguous view. A
        # retry of part of a failed step gathers its rows instead (slower, and rare).
        order = sorted(range(n), key=rows.__getitem__)
        seqs = [seqs[i] for i in order]
        sorted_rows = [rows[i] for i in order]
        lengths = torch.tensor([cache.lengths[r] for r in sorted_rows], device=self.device)
        drafts = self._drafts(seqs) if sorted_rows == list(range(n)) else None
        if drafts is not None and any(drafts):
            chosen = self._check_drafts(seqs, sorted_rows, lengths, drafts)
        else:
            last = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device).unsqueeze(1)
            attention = self._attention(self._prepare_decode(sorted_rows, lengths))
            hidden = self.forward.hidden(self.forward.embed(last), lengths.unsqueeze(1), attention.attend,
                                         attend_joined=attention.joined, decode_cache=attention.decode_cache())
            logits = self.forward.logits(hidden[:, -1])
            chosen = _one_each(sample(logits, self._rows(seqs)))
        # only now: a step that raised before here is retried over the same positions
        for r, tokens in zip(sorted_rows, chosen):
            cache.lengths[r] += 1 if isinstance(tokens, SamplingError) else len(tokens)
        back: list[list[Sampled] | SamplingError] = [[]] * n
        for pos, i in enumerate(order):
            back[i] = chosen[pos]
        return back

    # -- speculative decoding (speculation.py) ------------------------------------------------------------
    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Tokens proposed for each sequence (maybe none): at most speculative_tokens each, the batch's pass
        within forward.speculative_rows tokens, and never past a sequence's max_tokens."""
        k = min(self.speculative_tokens, self.forward.speculative_rows // len(seqs) - 1)
        if k <= 0:
            return [[] for _ in seqs]
        drafts = []
        for seq in seqs:
            req = seq.request
            drafter = self._drafters.get(req.request_id)
            if drafter is None:
                drafter = self._drafters[req.request_id] = NgramDrafter(req.prompt_token_ids)
            drafter.extend(seq.output_ids[len(drafter) - len(req.prompt_token_ids):])
            drafts.append(drafter.propose(min(k, req.sampling.max_tokens - len(seq.output_ids) - 1)))
        return drafts

    def _check_drafts(self, seqs: list[Sequence], rows: list[int], lengths: torch.Tensor,
                      drafts: list[list[int]]) -> list[list[Sampled] | SamplingError]:
        """One pass over each sequence's last token and its proposed tokens, at consecutive positions of its
        row (rows 0..n-1), each attending up to its own position; then each sequence's tokens as decoding
        one at a time would choose them (exact_rows: every position's logits are those of a pass of its own)."""
        counts = [1 + len(d) for d in drafts]
        ids = torch.tensor([t for seq, d in zip(seqs, drafts) for t in (seq.output_ids[-1], *d)],
                           device=self.device).unsqueeze(1)
        in_batch = torch.repeat_interleave(torch.arange(len(seqs), device=self.device),
                                           torch.tensor(counts, device=self.device))
        at = torch.cat([self._positions[int(n):int(n) + c] for n, c in zip(lengths, counts)])
        token_rows = torch.tensor(rows, device=self.device)[in_batch]
        meta = StepMetadata(start=0, count=len(seqs), width=int(at.max()) + 1, write_rows=token_rows.unsqueeze(1),
                            write_at=at.unsqueeze(1), token_rows=token_rows, token_at=at, token_in_batch=in_batch)
        attention = self._attention(meta)
        hidden = self.forward.hidden(self.forward.embed(ids), at.unsqueeze(1), attention.attend,
                                     attend_joined=attention.joined, decode_cache=attention.decode_cache())
        logits = self.forward.logits(hidden[:, -1], exact_rows=True)
        chosen, offset = [], 0
        for seq, draft, count in zip(seqs, drafts, counts):
            chosen.append(self._accept(seq, logits[offset:offset + count], draft))
            offset += count
        return chosen

    def _accept(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[Sampled] | SamplingError:
        """The tokens chosen at a checked sequence's positions, in order: position j's logits were computed
        after draft[:j], so they count only while every earlier choice was the proposed token. Each position
        is sampled as a step of its own would sample it (its penalties see the tokens chosen before it, its
        grammar has accepted them, its generator draws once per token kept), so speculation changes no
        output, seeded ones included; it stops at a token that ends the sequence."""
        row = self._rows([seq])[0]
        params = seq.request.sampling
        # greedy without transforms: one argmax over all positions (nothing depends on the earlier choices)
        batched = sample(logits, [row] * len(logits)) if params.greedy and not row.special else None
        chosen: list[Sampled] = []
        for j in range(len(logits)):
            if batched is not None:
                token = batched[j]
            else:
                row.output_ids = seq.output_ids + [c.token for c in chosen]
                token = sample(logits[j:j + 1], [row])[0]
            if isinstance(token, SamplingError):
                # after a kept token the next step computes this position again and meets the error there
                return chosen or token
            chosen.append(token)
            if j == len(draft) or token.token != draft[j] or self._ends(seq, row, token.token, len(chosen)):
                break
        self.draft_tokens += len(draft)
        self.accepted_draft_tokens += len(chosen) - 1
        return chosen

    def _ends(self, seq: Sequence, row: RowState, token: int, new: int) -> bool:
        """Whether the sequence ends with this token, its new-th this step (the scheduler's rule, or a finished
        grammar), so nothing after it is sampled."""
        ends = seq.request.sampling.ends_on(token, len(seq.output_ids) + new, self.stop_token_ids)
        return ends is not None or (row.constraint is not None and row.constraint.finished)
