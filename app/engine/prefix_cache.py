"""Device-resident per-layer prefixes of prompt sets, kept in a bounded LRU.

Both kinds end up as keys/values [L, KVH, P, D] in the model dtype: a `deep` set is one already, an
`input` set is run through the model once (see DecoderForward.prefix_kv). Entries are keyed by the
content's sha256, never by (task, version): bytes read from disk are hashed and must match the hash the
request was resolved with, so the cache cannot serve a deleted version's tensors for new bytes under a
reused name or number. A running request keeps the tensors it started with even when they are evicted.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.types import PromptSetRef
from app.model.forward import DecoderForward
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
    def __init__(self, forward: DecoderForward, shape: psf.BaseModelShape, device: torch.device,
                 dtype: torch.dtype, capacity: int, max_bytes: int = 1 << 30):
        self.forward = forward
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
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
        try:
            data = Path(ref.path).read_bytes()
        except OSError:
            raise psf.PromptSetError(f"{ref.task} v{ref.version} is no longer stored") from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise psf.PromptSetError(f"{ref.task} v{ref.version} changed on disk")
        return self.put(ref.sha256, psf.parse(data))

    def put(self, sha256: str, ps: psf.PromptSet) -> Prefix:
        """Build and keep the prefix of a prompt set whose bytes hash to sha256 (an upload preloads its
        content this way before it is stored, so the first request to it finds it resident)."""
        with self._lock:
            prefix = self._entries.get(sha256)
        if prefix is not None:
            return prefix
        prefix = self.build(ps)
        with self._lock:
            self.misses += 1  # built: a load from disk, or an upload's preload
            if sha256 not in self._entries:
                self._entries[sha256] = prefix
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

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def resident_bytes(self) -> int:
        return self._bytes
