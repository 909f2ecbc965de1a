"""Frozen linear layers with their weights pre-packed for oneDNN, for CPU inference.

On CPU, `F.linear` re-lays the weight out for the matmul kernel on every call. Packing once (what
`torch.compile` with freezing does for CPU linears) skips that: on this 2-core AVX-512 machine SmolLM2's
bf16 decode steps took about a third less time at batch 1, with identical outputs
(benchmarks/engine_steps.py).
The packed copy costs as much memory as the weights themselves: the server releases the model's own
weights as each copy is made (`release_weight`), so they are held once; training and the Hugging Face
baselines keep the model's own.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Linear = Callable[[torch.Tensor], torch.Tensor]
# small_batch_linear(x [m, k], w [n, k]) -> [m, n]: the native kernel for a few rows (kernels/)
SmallBatchLinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# rows up to which the native kernel runs: faster than oneDNN for every SmolLM2 projection at 1-2 rows,
# not at 4 (gate/up 147 vs 141 us, lm_head 1978 vs 1759 us; a per-shape timing on the AMD EPYC machine)
SMALL_BATCH_ROWS = 2
# rows the kernel takes at most: a speculative step's check of proposed tokens runs them all on it, since its
# rows are computed alone in a fixed order (each row's result is what a pass of its own gives)
SMALL_BATCH_MAX_ROWS = 4


class PackedLinear:
    """A frozen linear as oneDNN's packed matmul; with `small` (the native small-batch kernel), inputs of at
    most SMALL_BATCH_ROWS rows go to that kernel over the plain weight instead, which it streams at close
    to the memory bandwidth (the plain weight is the module's own; a concatenation keeps its own copy).
    With `any_rows`, `small` takes every input (the native bf16_linear, on CPUs whose oneDNN emulates bf16):
    no packed copy is made, so the weight is held once."""

    def __init__(self, linear: torch.nn.Linear, small: SmallBatchLinear | None = None, any_rows: bool = False):
        self._pack(linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None, small,
                   any_rows)

    @classmethod
    def concat(cls, linears: list[torch.nn.Linear], small: SmallBatchLinear | None = None,
               any_rows: bool = False) -> PackedLinear:
        """Several linears of the same input as one (outputs side by side): one matmul instead of several,
        e.g. q/k/v or gate/up: 4 calls a layer instead of 7 saved SmolLM2 1-4 ms of projections a step
        (benchmarks/engine_steps.py)."""
        self = cls.__new__(cls)
        biases = [lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features,
                                                                              dtype=lin.weight.dtype)
                  for lin in linears]
        has_bias = any(lin.bias is not None for lin in linears)
        self._pack(torch.cat([lin.weight.detach() for lin in linears]), torch.cat(biases) if has_bias else None,
                   small, any_rows)
        return self

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None, small: SmallBatchLinear | None,
              any_rows: bool) -> None:
        fits = small is not None and weight.dtype == torch.bfloat16 and weight.shape[1] % 32 == 0
        self._any_rows = fits and any_rows
        # the kernel has no bias: it takes a biased linear only where it takes every input (bias added after)
        self._small = small if fits and (bias is None or self._any_rows) else None
        self._plain = weight.contiguous() if self._small is not None or any_rows else None
        # any_rows: oneDNN's bf16 is emulated here, or refused (AVX2), so no packed copy is made; a weight the
        # kernel cannot take (k not a multiple of 32) runs F.linear on the plain weight. Otherwise the packed
        # copy; the batch-size hint only tunes the packing (measured equally fast for batches of 1 to 300)
        self.weight = None if any_rows else torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = bias
        self.out_features = weight.shape[0]

    @property
    def small_batch_weight(self) -> torch.Tensor | None:
        """The plain weight the native small-batch kernel reads, for the native decode op (None where the
        kernel does not run, or where the linear has a bias, which the op does not add)."""
        return self._plain if self._small is not None and self.bias is None else None

    def __call__(self, x: torch.Tensor, small_rows: int = SMALL_BATCH_ROWS) -> torch.Tensor:
        """small_rows: inputs of at most this many rows go to the small-batch kernel (where it runs)."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self._small is not None and (self._any_rows or (rows.shape[0] <= small_rows and x.dtype == torch.bfloat16)):
            y = self._small(rows, self._plain)  # with any_rows, a non-bf16 input is refused by the kernel by name
            if self.bias is not None:  # (any_rows only) rounded twice, where oneDNN adds it before rounding
                y = y + self.bias
        elif self.weight is None:
            y = F.linear(rows, self._plain, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)


def packing_works(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU with oneDNN, and a packed linear that gives F.linear's result on this machine and dtype."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(64, 48, bias=True).to(dtype)
        x = torch.randn(3, 5, 64, generator=g).to(dtype)
        with torch.inference_mode():
            return bool(torch.allclose(PackedLinear(layer)(x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                       atol=1e-2, rtol=1e-2))
    except Exception as exc:  # an op missing from this torch build, an unsupported dtype
        log.info("packed linears unavailable (%s): using the model's own", exc)
        return False


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's linear weights (each tensor once: a head tied to the embedding counts once)."""
    seen = {id(m.weight): m.weight for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.device.type != "meta"}
    return sum(w.numel() * w.element_size() for w in seen.values())


def release_weight(module: torch.nn.Linear) -> None:
    """Drop a linear's own weight once a packed copy replaces it: a meta tensor of the same shape keeps the
    module printable, and any use of the module's own forward fails loudly instead of computing garbage."""
    module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)


def linear(module: torch.nn.Linear, pack: bool, small: SmallBatchLinear | None = None,
           any_rows: bool = False) -> Linear:
    return PackedLinear(module, small, any_rows) if pack else module
