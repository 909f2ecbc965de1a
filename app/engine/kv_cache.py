"""A key/value cache allocated once: [num_layers, rows, num_kv_heads, max_len, head_dim] for K and V.

Running sequences occupy rows 0..n-1 with no gaps, so a decode step reads ``k[layer, :n, :, :len]`` as a
view instead of gathering rows. A row's layout is ``[prefix | prompt | generated]``, and a position's
cache index is also its rotary position. When a sequence leaves, the last row moves into its place (one
row copy per finished request, instead of a gather per step).

One more row, the staging row, holds a long prompt while it is prefilled in chunks over several steps;
after its last chunk it moves (one row copy) to the end of the running rows. Decode never reads it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, rows + 1, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = rows
        self.staging_row = rows
        self.max_len = max_len
        self.lengths: list[int] = []  # valid positions per occupied row
        self.owners: list[str] = []  # request id per occupied row
        self._row_of: dict[str, int] = {}
        self._staging_owner: str | None = None
        self._staging_len = 0

    @property
    def num_used(self) -> int:
        return len(self.owners)

    def row_of(self, owner: str) -> int:
        return self.staging_row if owner == self._staging_owner else self._row_of[owner]

    def length(self, row: int) -> int:
        return self._staging_len if row == self.staging_row else self.lengths[row]

    def set_length(self, row: int, n: int) -> None:
        if row == self.staging_row:
            self._staging_len = n
        else:
            self.lengths[row] = n

    def allocate_staging(self, owner: str) -> int:
        if self._staging_owner is not None:
            raise RuntimeError("the staging row is taken")
        self._staging_owner, self._staging_len = owner, 0
        return self.staging_row

    def commit_staging(self) -> int:
        """Move the staged sequence to the end of the running rows; returns its new row."""
        owner, n = self._staging_owner, self._staging_len
        self._staging_owner = None
        row = self.allocate(owner)
        self.k[:, row, :, :n] = self.k[:, self.staging_row, :, :n]
        self.v[:, row, :, :n] = self.v[:, self.staging_row, :, :n]
        self.lengths[row] = n
        return row

    def allocate(self, owner: str) -> int:
        if len(self.owners) >= self.rows:
            raise RuntimeError("KV cache has no free row")
        row = len(self.owners)
        self.owners.append(owner)
        self.lengths.append(0)
        self._row_of[owner] = row
        return row

    def write_prefix(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place a prompt set's per-layer prefix [L, kvh, P, hd] at the start of a row."""
        p = keys.shape[2]
        self.k[:, row, :, :p] = keys
        self.v[:, row, :, :p] = values
        self.set_length(row, p)

    def release(self, owner: str) -> None:
        if owner == self._staging_owner:
            self._staging_owner = None
            return
        row = self._row_of.pop(owner, None)
        if row is None:
            return
        last = len(self.owners) - 1
        if row != last:
            moved = self.owners[last]
            n = self.lengths[last]
            self.k[:, row, :, :n] = self.k[:, last, :, :n]
            self.v[:, row, :, :n] = self.v[:, last, :, :n]
            self.owners[row] = moved
            self.lengths[row] = n
            self._row_of[moved] = row
        self.owners.pop()
        self.lengths.pop()
