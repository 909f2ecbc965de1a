"""Attention over the KV cache for one forward pass.

The runner prepares a StepMetadata before the pass runs (which rows it reads, how wide, where each token's
key and value go, the mask or the native kernel's positions); the forward then calls CacheAttention's
`attend` (torch's path: q, k, v rotated in the padded [B, heads, T, D] layout, written by index, then SDPA
with the mask, or the native kernel when each row has one token) or `attend_joined` (the native path: rotary
and the cache write of the running tokens in one op, then the kernel) for every layer. Nothing here is
decided while a layer runs: it reads the metadata (vLLM's attention metadata, nano-vllm's Context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from app.model.forward import DecodeCache


@dataclass
class StepMetadata:
    # the rows the pass reads: cache rows start..start+count-1 as a view, or `gather` (a retry of part of a
    # step reads its rows by index)
    start: int
    count: int
    width: int  # positions read per row
    # where each token's key and value go (torch's path), in the padded layout [B, T]
    write_rows: torch.Tensor
    write_at: torch.Tensor
    gather: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # torch's path with SDPA; None: the native kernel (one token per row)
    # the native kernel: each token's cache row, its position (= what it may see up to) and, when a row runs
    # several tokens (prefill, a speculative check), its row within the batch; decode runs one token per row,
    # in row order
    token_rows: torch.Tensor | None = None
    token_at: torch.Tensor | None = None
    token_in_batch: torch.Tensor | None = None


class CacheAttention:
    """The attend callbacks of one forward pass, reading its StepMetadata."""

    def __init__(self, cache, forward, meta: StepMetadata, kernel: Callable | None,
                 rotary_cache_write: Callable | None, write_kv: Callable):
        self.cache, self.f, self.meta = cache, forward, meta
        self.kernel, self.rotary_cache_write, self.write_kv = kernel, rotary_cache_write, write_kv
        # what the forward is given as attend_joined: the native path when rotary and the cache write are one op
        self.joined = self.attend_joined if rotary_cache_write is not None else None

    def keys_values(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, m = self.cache, self.meta
        if m.gather is None:
            return c.k[i, m.start:m.start + m.count, :, :m.width], c.v[i, m.start:m.start + m.count, :, :m.width]
        return c.k[i][m.gather, :, :m.width], c.v[i][m.gather, :, :m.width]

    def decode_cache(self) -> DecodeCache | None:
        """For the native decode op (DecoderForward.hidden's decode_cache): the cache as it reads it, when this
        pass is a decode on the native path reading contiguous rows (one token a row, or a speculative check's
        several); else None. Prefill passes never ask."""
        m = self.meta
        if self.joined is None or m.gather is not None or m.mask is not None:
            return None
        return DecodeCache(self.cache.k, self.cache.v, m.token_rows, m.token_at, m.start, m.count, m.width,
                           m.token_in_batch)

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """torch's path: q, k, v [B, heads, T, D], rotated."""
        m, f = self.meta, self.f
        self.write_kv(i, m.write_rows, m.write_at, k, v)
        keys, values = self.keys_values(i)
        if m.mask is not None:
            return f.grouped_attention(q, keys, values, m.mask)
        # one token per row: the native kernel, row b seeing positions 0..token_at[b] (no mask tensor)
        n = q.shape[0]
        o = self.kernel(q.reshape(n, f.num_kv_heads, f.group, f.head_dim).contiguous(), keys, values, m.token_at,
                        f.scale)
        return o.view(n, f.num_heads, 1, f.head_dim)

    def attend_joined(self, i: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The native path: each running token's projection, unrotated, [N, (H + 2 KVH) D]."""
        m, f, c = self.meta, self.f, self.cache
        q = self.rotary_cache_write(qkv, cos, sin, c.k[i], c.v[i], m.token_rows, m.token_at, f.num_heads,
                                    f.num_kv_heads)
        keys, values = self.keys_values(i)
        rows = () if m.token_in_batch is None else (m.token_in_batch,)
        o = self.kernel(q.view(-1, f.num_kv_heads, f.group, f.head_dim), keys, values, m.token_at, f.scale, *rows)
        return o.view(q.shape[0], -1)
