"""Device-resident per-layer prefixes of prompt sets, kept in a bounded LRU.

Both kinds end up as keys/values [L, KVH, P, D] in the model dtype: a `deep` set is one already, an
`input` set is run through the model once (see LlamaForward.prefix_kv). Stored versions are immutable,
so (task, version) is a safe cache key: a new upload is a new key, and a running request keeps the
tensors it started with even when its version is evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from app.engine.llama import LlamaForward
from app.engine.types import PromptSetRef
from prompt_store import format as psf


@dataclass
class Prefix:
    keys: torch.Tensor
    values: torch.Tensor
    head_weight: torch.Tensor | None = None  # classify / extract head
    head_bias: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> int:
        head = [t for t in (self.head_weight, self.head_bias) if t is not None]
        return 2 * self.keys.numel() * self.keys.element_size() + sum(t.numel() * t.element_size() for t in head)


class PrefixCache:
    def __init__(self, forward: LlamaForward, shape: psf.BaseModelShape, device: torch.device,
                 dtype: torch.dtype, capacity: int, max_bytes: int = 1 << 30):
        self.forward = forward
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple[str, int], Prefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, ref: PromptSetRef) -> Prefix:
        with self._lock:
            prefix = self._entries.get(ref.key)
            if prefix is not None:
                self._entries.move_to_end(ref.key)
                self.hits += 1
                return prefix
            self.misses += 1
        prefix = self.build(psf.load(ref.path))
        if prefix.length != ref.num_virtual_tokens:
            raise psf.PromptSetError(f"{ref.task} v{ref.version} changed on disk")
        with self._lock:
            if ref.key not in self._entries:
                self._entries[ref.key] = prefix
                self._bytes += prefix.nbytes()
            # bounded by count and by bytes; a running request keeps its own reference to an evicted prefix
            while len(self._entries) > 1 and (len(self._entries) > self.capacity or self._bytes > self.max_bytes):
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes()
        return prefix

    @torch.inference_mode()
    def build(self, ps: psf.PromptSet) -> Prefix:
        psf.check_compatible(ps, self.shape)
        # The head runs in float32: it is tiny, and label probabilities should not carry bf16 rounding.
        head = [ps.tensors[n].to(self.device, torch.float32) if n in ps.tensors else None
                for n in ("head.weight", "head.bias")]
        if ps.kind == "deep":
            return Prefix(ps.tensors["keys"].to(self.device, self.dtype).contiguous(),
                          ps.tensors["values"].to(self.device, self.dtype).contiguous(), *head)
        embeddings = ps.tensors["embeddings"].to(self.device, self.dtype)
        keys, values = self.forward.prefix_kv(embeddings)
        return Prefix(keys.contiguous(), values.contiguous(), *head)

    def __contains__(self, key: tuple[str, int]) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def resident_bytes(self) -> int:
        return self._bytes
