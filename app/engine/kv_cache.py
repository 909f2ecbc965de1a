"""A key/value cache within a memory budget: [num_layers, rows, num_kv_heads, length, head_dim] for K and V.

Running sequences occupy rows 0..n-1 with no gaps, so a decode step reads ``k[layer, :n, :, :len]`` as a
view instead of gathering rows. A row's layout is ``[prefix | prompt | generated]``, and a position's
cache index is also its rotary position. When a sequence leaves, the last row moves into its place (one
row copy per finished request, instead of a gather per step).

One more row, the staging row, holds a long prompt while it is prefilled in chunks over several steps;
after its last chunk it moves (one row copy) to the end of the running rows. Decode never reads it.

The tensors are not rows x the full context: they hold as many rows, and as many positions per row, as the
sequences admitted need, and grow (a copy of what is in use) when an admitted sequence needs more, within
`budget_bytes`. A sequence reserves its final length when it is admitted (prefix + prompt + max_tokens), so
the cache never has to grow while it decodes, and the scheduler admits sequences only while
`fits(rows, longest)` (vLLM's KV-cache space, without paging: every row has the longest reservation's
length). While nothing runs, the tensors shrink back. A budget that cannot hold one sequence of the full
context is refused when the cache is made (KVCacheTooSmall).
"""

from __future__ import annotations

import torch

from app.model.memory import available_bytes

LENGTH_STEP = 256  # positions are allocated in steps of this many


class KVCacheTooSmall(ValueError):
    """The budget cannot hold one sequence of the full context."""


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, budget_bytes: int | None = None):
        self.max_rows = rows
        self.max_len = max_len
        self._shape = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        # K and V of one position in every layer
        self.position_bytes = 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        full = self.bytes_for(rows, max_len)
        self.budget_bytes = full if budget_bytes is None else min(budget_bytes, full)
        one = self.bytes_for(1, max_len)
        if self.budget_bytes < one:
            raise KVCacheTooSmall(
                f"the KV-cache budget of {self.budget_bytes / 2**20:.0f} MiB cannot hold one sequence of the full "
                f"{max_len}-token context ({one / 2**20:.0f} MiB): raise PROMPTSERVE_KV_CACHE_MB or lower "
                "PROMPTSERVE_MAX_MODEL_LEN")
        self.lengths: list[int] = []  # valid positions per occupied row
        self.owners: list[str] = []  # request id per occupied row
        self.reserved: dict[str, int] = {}  # positions each sequence may reach (staged one included)
        self._row_of: dict[str, int] = {}
        self._staging_owner: str | None = None
        self._staging_len = 0
        self._allocate(*self._initial())

    # -- capacity --------------------------------------------------------------------------------
    def bytes_for(self, rows: int, longest: int) -> int:
        """Bytes of a cache for `rows` sequences of up to `longest` positions: the staging row and one spare
        position per row included (a padded prefill's pads write there, past every valid position)."""
        return self._bytes(rows, self._length_for(longest))

    def _length_for(self, longest: int) -> int:
        """Positions a row is allocated for `longest`: one spare, in steps of LENGTH_STEP, at most the context's."""
        return min(_round_up(longest + 1, LENGTH_STEP), self.max_len + 1)

    def _bytes(self, rows: int, length: int) -> int:
        return self.position_bytes * (rows + 1) * length  # the staging row too

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` sequences, the longest reserving `longest` positions, fit the budget."""
        return rows <= self.max_rows and self.bytes_for(rows, longest) <= self.budget_bytes

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_bytes  # a plain number: the metrics read it from another thread

    @property
    def row_capacity(self) -> int:
        return self.k.shape[1] - 1

    @property
    def length_capacity(self) -> int:
        return self.k.shape[3]

    @property
    def staging_row(self) -> int:
        return self.row_capacity

    def _initial(self) -> tuple[int, int]:
        return min(self.max_rows, 4), min(LENGTH_STEP, self.max_len + 1)

    def _allocate(self, rows: int, length: int) -> None:
        layers, kvh, hd = self._shape
        shape = (layers, rows + 1, kvh, length, hd)
        # zeros, not empty: the masked attention path reads padding positions (masked to -inf; NaN would leak).
        # Normal tensors even when grown inside a step's inference mode: rows are moved outside it too
        with torch.inference_mode(False):
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._allocated_bytes = 2 * self.k.numel() * self.k.element_size()

    def ensure(self, rows: int, longest: int) -> None:
        """Room for `rows` running rows of `longest` positions (one spare): grown when short, keeping every
        occupied row and the staging row. Rows grow by doubling and positions by LENGTH_STEP, within the
        budget (down to exactly what is asked when the budget is tight)."""
        needed = self._length_for(longest)
        if rows <= self.row_capacity and needed <= self.length_capacity:
            return
        length = max(needed, self.length_capacity)
        affordable = self.budget_bytes // (self.position_bytes * length) - 1  # rows at this length, staging aside
        new_rows = self.row_capacity if rows <= self.row_capacity else \
            min(self.max_rows, max(rows, 2 * self.row_capacity))
        new_rows = max(rows, min(new_rows, affordable))
        if self._bytes(new_rows, length) > self.budget_bytes:
            length, new_rows = needed, rows  # not wider, nor more rows, than needed
            if self._bytes(rows, length) > self.budget_bytes:
                raise RuntimeError(f"{rows} rows of {longest} positions exceed the KV-cache budget")
        old_k, old_v, old_staging = self.k, self.v, self.staging_row
        self.k = self.v = None  # the old tensors are held only here while the new ones fill
        self._allocate(max(new_rows, self.num_used), length)
        n, width = self.num_used, min(old_k.shape[3], length)
        if n:
            self.k[:, :n, :, :width] = old_k[:, :n, :, :width]
            self.v[:, :n, :, :width] = old_v[:, :n, :, :width]
        if self._staging_owner is not None:
            self.k[:, self.staging_row, :, :width] = old_k[:, old_staging, :, :width]
            self.v[:, self.staging_row, :, :width] = old_v[:, old_staging, :, :width]

    @property
    def longest_reserved(self) -> int:
        return max(self.reserved.values(), default=0)

    def shrink_if_idle(self) -> None:
        """With no sequence in the cache, give back what a burst grew it to."""
        if self.owners or self._staging_owner is not None:
            return
        rows, length = self._initial()
        if self.row_capacity > rows or self.length_capacity > length:
            self.k = self.v = None
            self._allocate(rows, length)

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

    def allocate_staging(self, owner: str, reserved: int = 0) -> int:
        if self._staging_owner is not None:
            raise RuntimeError("the staging row is taken")
        self._staging_owner, self._staging_len = owner, 0
        self.reserved[owner] = reserved
        return self.staging_row

    def commit_staging(self) -> int:
        """Move the staged sequence to the end of the running rows; returns its new row."""
        owner, n = self._staging_owner, self._staging_len
        self.ensure(self.num_used + 1, self.longest_reserved)  # it joins the running rows
        self._staging_owner = None
        row = self.allocate(owner, self.reserved[owner])
        self.k[:, row, :, :n] = self.k[:, self.staging_row, :, :n]
        self.v[:, row, :, :n] = self.v[:, self.staging_row, :, :n]
        self.lengths[row] = n
        return row

    def allocate(self, owner: str, reserved: int = 0) -> int:
        if len(self.owners) >= self.row_capacity:
            raise RuntimeError("KV cache has no free row (ensure() first)")
        self.reserved[owner] = reserved
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

    def write_positions(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Place keys/values [L, kvh, n, hd] at positions start..start+n of a row (a prompt's beginning from
        the prompt cache, after its prompt set's prefix); the row's length becomes start + n."""
        end = start + keys.shape[2]
        self.k[:, row, :, start:end] = keys
        self.v[:, row, :, start:end] = values
        self.set_length(row, end)

    def release(self, owner: str) -> None:
        self.reserved.pop(owner, None)
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


def default_budget_bytes(device: torch.device, fraction: float = 0.25) -> int:
    """A budget from what the machine has free once the model is loaded: `fraction` of the memory
    available to this process (app/model/memory.py; 4 GiB where the machine does not say). Like vLLM's
    VLLM_CPU_KVCACHE_SPACE / gpu_memory_utilization, but sized here."""
    available = available_bytes(device)
    return int((available if available is not None else 4 << 30) * fraction)
