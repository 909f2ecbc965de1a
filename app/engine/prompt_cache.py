"""Keys and values of prompt beginnings already computed, reused by later prompts that start the same way.

Requests of one task share their opening tokens: the chat template's system prompt and the task's own
instructions (in the benchmark's mix, 24-29 of ~58 prompt tokens). Their keys and values are the same
for every such request, so a new request copies them into its cache row and prefills only the rest
(vLLM's automatic prefix caching, without paging: blocks are copied into a sequence's row, not shared).

A prompt is cut into blocks of BLOCK_TOKENS tokens. A block's identity is a sha256 chain: the prompt set's
content hash (its keys and values come after that prefix, so they depend on it), the model's fingerprint,
and every token up to the block's end. A block is therefore only ever reused behind exactly the same
tokens, after exactly the same prompt set: a deleted or replaced version's blocks are unreachable by
requests for the new bytes, and wait in the LRU until evicted.

Only the blocks of generate requests that need nothing from the prompt's own positions are reused (no
prompt log-probabilities; classify and extract heads read the prompt's hidden states, which a copied
block does not have). At least the prompt's last token is always computed: its hidden state gives the first
token. Bounded by bytes, least recently used first out, one prompt's blocks at most a quarter of it; a
match holds its tensors, so an eviction between the match and the copy cannot take them away.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 8


@dataclass(frozen=True)
class CachedPrompt:
    """The keys and values [L, kvh, tokens, hd] of a prompt's first `tokens` tokens, found in the cache."""

    tokens: int
    keys: torch.Tensor
    values: torch.Tensor


class PromptCache:
    def __init__(self, max_bytes: int, fingerprint: str = "", block_tokens: int = BLOCK_TOKENS):
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self._root = hashlib.sha256(f"promptserve prompt cache\0{fingerprint}".encode()).digest()
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the engine thread writes; the metrics read from others
        # counted by the model runner: prompt tokens of the requests that could reuse blocks, and those of them
        # copied from the cache instead of prefilled
        self.prompt_tokens = 0
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _chain(self, prompt_set_key: str | None, tokens: list[int], blocks: int) -> list[bytes]:
        """The identities of the first `blocks` blocks of `tokens` behind this prompt set."""
        digest = hashlib.sha256(self._root + (prompt_set_key or "").encode()).digest()
        b = self.block_tokens
        keys = []
        for i in range(blocks):
            digest = hashlib.sha256(digest + array("q", tokens[i * b:(i + 1) * b]).tobytes()).digest()
            keys.append(digest)
        return keys

    def match(self, prompt_set_key: str | None, tokens: list[int]) -> CachedPrompt | None:
        """The longest run of cached blocks that begins the prompt, leaving its last token to compute."""
        if not self.enabled:
            return None
        usable = (len(tokens) - 1) // self.block_tokens
        if usable == 0:
            return None
        found = []
        with self._lock:
            for key in self._chain(prompt_set_key, tokens, usable):
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
        if not found:
            return None
        n = len(found) * self.block_tokens
        keys = found[0][0] if len(found) == 1 else torch.cat([k for k, _ in found], dim=2)
        values = found[0][1] if len(found) == 1 else torch.cat([v for _, v in found], dim=2)
        return CachedPrompt(n, keys, values)

    def store(self, prompt_set_key: str | None, tokens: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the whole blocks of a computed prompt: keys/values [L, kvh, >= len(tokens), hd], the prompt's
        positions only (the prompt set's prefix excluded). Blocks already cached are left as they are.

        One prompt keeps at most its first quarter of the cache's bytes: the beginnings are what later prompts
        share, and one long prompt (an 8B model's 2,000 tokens are ~260 MB) would otherwise push out every
        other block, and cost a copy of all of it, for a tail nobody repeats."""
        if not self.enabled:
            return
        b = self.block_tokens
        block_bytes = 2 * keys[:, :, :b].numel() * keys.element_size()
        blocks = min(len(tokens) // b, self.max_bytes // 4 // block_bytes)
        if blocks <= 0:
            return
        chain = self._chain(prompt_set_key, tokens, blocks)
        with self._lock:
            missing = [i for i, key in enumerate(chain) if key not in self._blocks]
        for i in missing:
            k = keys[:, :, i * b:(i + 1) * b].clone()
            v = values[:, :, i * b:(i + 1) * b].clone()
            size = 2 * k.numel() * k.element_size()
            with self._lock:
                if chain[i] in self._blocks:
                    continue
                self._blocks[chain[i]] = (k, v)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (old_k, old_v) = self._blocks.popitem(last=False)
                    self._bytes -= 2 * old_k.numel() * old_k.element_size()

    def resident_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)
