"""Which projection path the model runner builds from what the CPU offers (no native build needed: the kernels
and oneDNN's packing are stood in for)."""

import asyncio

import torch
import torch.nn.functional as F

import app.engine.model_runner as model_runner
from app.engine import kernels
from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, SamplingParams
from app.model.linear import PackedLinear
from app.model.loader import load_model
from app.settings import Settings


def test_bf16_on_a_cpu_whose_onednn_packs_no_bf16_runs_every_projection_on_bf16_linear(monkeypatch, tiny_model_dir):
    """An AVX2-only CPU: oneDNN refuses to pack bf16 and its bf16 F.linear is reference code (~1 GFLOP/s), so the
    engine must not depend on packing where bf16_linear is built: every projection, the head included, goes to
    it at any batch, and generation runs."""
    calls: list[int] = []

    def bf16_linear(x, w):
        assert x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        calls.append(x.shape[0])
        return F.linear(x.float(), w.float()).bfloat16()
    monkeypatch.setattr(model_runner, "packing_works", lambda device, dtype: False)
    monkeypatch.setattr(kernels, "load", lambda cache_dir: kernels.NativeKernels(bf16_linear=bf16_linear))
    loaded = load_model(Settings(model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    engine = Engine(loaded, EngineConfig(max_num_seqs=2, max_model_len=64, kernel_cache_dir="unused",
                                         speculative_tokens=0))
    forward = engine.runner.forward
    projections = [forward.lm_head] + [p for lin in forward.linears for p in (lin.qkv_joined, lin.o, lin.down)]
    assert all(isinstance(p, PackedLinear) and p.weight is None for p in projections)  # no packed copy
    engine.start()

    async def generate() -> list[int]:
        request = EngineRequest(loaded.tokenizer.encode("hello there, how are you today"),
                                SamplingParams(max_tokens=4, ignore_eos=True))
        return [t async for out in engine.generate(request) for t in out.token_ids]
    try:
        tokens = asyncio.run(generate())
    finally:
        engine.stop()
    assert len(tokens) == 4
    assert 1 in calls and max(calls) > 2  # decode steps, and the prefill's rows: bf16_linear at any batch
