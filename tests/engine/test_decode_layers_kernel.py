"""The native decode op (app/engine/kernels/decode_layers.cpp) runs every layer of a 1-2 token bfloat16 decode
step with the same kernels in the same order as the layer-by-layer path: the served tokens and their
log-probabilities are bit-identical with it and without it, alone and two at a time, and it is used only
where it applies."""

import asyncio

import pytest

from app.engine.types import EngineRequest
from app.model.loader import load_model
from app.settings import Settings
from benchmarks.tiny_model import FAMILIES
from tests.helpers import greedy, make_engine

PROMPTS = ["Tell me about the weather in Paris today.", "Name three colours.", "Count to five:"]


@pytest.fixture(scope="module")
def bf16(tiny_model_dir, native_kernels):
    if native_kernels.decode_layers is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: decode steps run layer by layer")
    return load_model(Settings(model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))


async def _answers(engine, loaded, together: bool):
    async def one(text):
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        tokens, logprobs = [], []
        async for out in engine.generate(EngineRequest(ids, greedy(12, ignore_eos=True, logprobs=3))):
            tokens.extend(out.token_ids)
            logprobs.extend((lp.logprob, lp.top) for lp in out.logprobs or [])
        return tokens, logprobs
    if together:  # two at a time: decode steps of two rows
        return [*await asyncio.gather(one(PROMPTS[0]), one(PROMPTS[1])), await one(PROMPTS[2])]
    return [await one(text) for text in PROMPTS]


@pytest.mark.parametrize("together", [False, True])
def test_bit_identical_to_the_layer_by_layer_path(bf16, together):
    # one token a row (speculation's checks of several are tests/engine/test_speculation.py's)
    fused, layered = make_engine(bf16, speculative_tokens=0), make_engine(bf16, speculative_tokens=0)
    try:
        forward = fused.runner.forward
        assert forward._decode_layers is not None, "the tiny Llama in bf16 is what the op implements"
        calls = []
        native = forward._decode_layers
        forward._decode_layers = lambda *a: calls.append(a[0].shape[0]) or native(*a)
        layered.runner.forward._decode_layers = None
        with_op = asyncio.run(_answers(fused, bf16, together))
        without = asyncio.run(_answers(layered, bf16, together))
    finally:
        fused.stop()
        layered.stop()
    assert with_op == without
    assert calls and set(calls) <= {1, 2} and (2 in calls) == together


# whether each family's layers are what the op implements (benchmarks/tiny_model.py's checkpoints): a q/k/v
# bias (llama-bias, Qwen2) keeps oneDNN's projections, Qwen3 normalizes q and k, Gemma's norm scales by
# 1 + weight, phi3-partial turns part of each head only
USES_THE_OP = {"llama3": True, "llama-linear": True, "llama-dynamic": True, "llama-yarn": True, "llama-bias": False,
               "mistral": True, "qwen2": False, "qwen3": False, "gemma": False, "phi3": True, "phi3-partial": False}


def test_every_family_is_listed():
    assert set(USES_THE_OP) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(USES_THE_OP))
def test_every_family_is_served_alike_with_it_or_without(family_model, native_kernels, name):
    if native_kernels.decode_layers is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2")
    loaded = family_model(name, "bfloat16")
    fused, layered = make_engine(loaded), make_engine(loaded)
    try:
        assert (fused.runner.forward._decode_layers is not None) == USES_THE_OP[name]
        layered.runner.forward._decode_layers = None
        assert asyncio.run(_answers(fused, loaded, True)) == asyncio.run(_answers(layered, loaded, True))
    finally:
        fused.stop()
        layered.stop()


def test_not_used_where_it_does_not_apply(tiny, native_kernels):
    """float32 runs layer by layer (it keeps torch's own ops), as does a bf16 engine without the kernels."""
    engine = make_engine(tiny)
    try:
        assert engine.runner.forward._decode_layers is None
    finally:
        engine.stop()
