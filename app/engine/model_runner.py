"""Runs the model for one scheduler step: prefill new sequences, decode running ones, sample.

Prompt sets enter in prefill only: their prefix is copied into the sequence's cache row, and from then
on the sequence decodes like any other, so one batch mixes tasks, kinds and prefix lengths freely.
"""

from __future__ import annotations

import logging

import torch

from app.engine.kv_cache import KVCache
from app.engine.llama import LlamaForward
from app.engine.prefix_cache import PrefixCache
from app.engine.sampling import make_generator, sample
from app.engine.types import SchedulerOutput, Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, shape, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int, prefix_cache_size: int, prefix_cache_bytes: int = 1 << 30):
        self.device = device
        self.forward = LlamaForward(model)
        f = self.forward
        self.cache = KVCache(len(f.layers), max_num_seqs, f.num_kv_heads, max_model_len, f.head_dim,
                             dtype, device)
        self.prefixes = PrefixCache(f, shape, device, dtype, prefix_cache_size, prefix_cache_bytes)
        self._generators: dict[str, torch.Generator | None] = {}
        self._positions = torch.arange(max_model_len, device=device)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> tuple[dict[str, int], dict[str, str], dict[str, dict]]:
        """Returns (sampled token per request id, error per request id that could not run, head results of
        classify/tag requests, which are done after their prefill)."""
        sampled: dict[str, int] = {}
        errors: dict[str, str] = {}
        results: dict[str, dict] = {}
        if step.decodes:
            tokens = self._decode(step.decodes)
            sampled.update(zip((s.request_id for s in step.decodes), tokens))
        for seq in step.prefills:
            try:
                out = self._prefill(seq)
                if isinstance(out, dict):
                    results[seq.request_id] = out
                    self.release(seq.request_id)
                else:
                    sampled[seq.request_id] = out
            except Exception as exc:  # a prompt set deleted or broken since the request was made
                log.warning("prefill of %s failed: %s", seq.request_id, exc)
                self.release(seq.request_id)
                errors[seq.request_id] = str(exc)
        return sampled, errors, results

    def release(self, request_id: str) -> None:
        self.cache.release(request_id)
        self._generators.pop(request_id, None)

    def _prefill(self, seq: Sequence) -> int | dict:
        req = seq.request
        row = self.cache.allocate(req.request_id)
        prefix = None
        if req.prompt_set is not None:
            prefix = self.prefixes.get(req.prompt_set)
            self.cache.write_prefix(row, prefix.keys, prefix.values)
        start = self.cache.lengths[row]
        ids = torch.tensor(req.prompt_token_ids, device=self.device).unsqueeze(0)
        t = ids.shape[1]
        end = start + t
        positions = self._positions[start:end].unsqueeze(0)
        # Query i (at cache index start+i) may see every index up to and including its own.
        allowed = (self._positions[:end].unsqueeze(0) <= positions.transpose(0, 1)).unsqueeze(0)
        cache = self.cache

        def attend(i, q, k, v):
            cache.k[i, row, :, start:end] = k[0]
            cache.v[i, row, :, start:end] = v[0]
            return self.forward.grouped_attention(
                q, cache.k[i, row:row + 1, :, :end], cache.v[i, row:row + 1, :, :end], allowed)

        hidden = self.forward.hidden(self.forward.embed(ids), positions, attend)
        cache.lengths[row] = end
        if req.mode != "generate":
            return self._apply_head(req, prefix, hidden[0])
        self._generators[req.request_id] = make_generator(req.sampling, self.device)
        logits = self.forward.logits(hidden[:, -1])
        return sample(logits, [req.sampling], [self._generators[req.request_id]])[0]

    @staticmethod
    def _apply_head(req, prefix, hidden: torch.Tensor) -> dict:
        if prefix is None or prefix.head_weight is None:
            raise ValueError(f"a {req.mode} request needs a prompt set with a head")
        rows = hidden[-1:] if req.mode == "classify" else hidden[req.tag_positions or []]
        logits = rows.float() @ prefix.head_weight.T
        if prefix.head_bias is not None:
            logits = logits + prefix.head_bias
        if req.mode == "classify":
            return {"scores": torch.softmax(logits[0], -1).tolist()}
        return {"tags": logits.argmax(-1).tolist()}

    def _decode(self, seqs: list[Sequence]) -> list[int]:
        cache = self.cache
        n = cache.num_used
        rows = [cache.row_of(s.request_id) for s in seqs]
        # Decode runs every occupied row, in row order; seqs is the same set in scheduler order.
        order = sorted(range(len(seqs)), key=rows.__getitem__)
        seqs = [seqs[i] for i in order]
        assert [rows[i] for i in order] == list(range(n)), "decode batch must be exactly the used rows"
        last = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device).unsqueeze(1)
        lengths = torch.tensor(cache.lengths[:n], device=self.device)
        width = int(max(cache.lengths[:n])) + 1
        row_index = torch.arange(n, device=self.device)
        allowed = (self._positions[:width].unsqueeze(0) <= lengths.unsqueeze(1)).unsqueeze(1)  # [n,1,S]

        def attend(i, q, k, v):
            cache.k[i, row_index, :, lengths] = k[:, :, 0]
            cache.v[i, row_index, :, lengths] = v[:, :, 0]
            return self.forward.grouped_attention(q, cache.k[i, :n, :, :width], cache.v[i, :n, :, :width],
                                                  allowed)

        hidden = self.forward.hidden(self.forward.embed(last), lengths.unsqueeze(1), attend)
        for r in range(n):
            cache.lengths[r] += 1
        logits = self.forward.logits(hidden[:, -1])
        tokens = sample(logits, [s.request.sampling for s in seqs],
                        [self._generators.get(s.request_id) for s in seqs])
        back = [0] * len(seqs)
        for pos, i in enumerate(order):
            back[i] = tokens[pos]
        return back
