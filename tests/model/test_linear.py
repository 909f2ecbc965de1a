import pytest
import torch
import torch.nn.functional as F

from app.model.forward import DecoderForward
from app.model.linear import PackedLinear, packing_works

needs_packing = pytest.mark.skipif(not packing_works(torch.device("cpu"), torch.float32),
                                   reason="this torch build has no oneDNN packed linear")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(dtype, bias):
    if not packing_works(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN packs no {dtype} here (bf16 on AVX2-only CPUs)")
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 80, bias=bias).to(dtype)
    packed = PackedLinear(layer)
    for shape in ((1, 96), (7, 96), (3, 5, 96)):
        x = torch.randn(*shape, generator=g).to(dtype)
        with torch.inference_mode():
            got, want = packed(x), F.linear(x, layer.weight, layer.bias)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)
    noncontiguous = torch.randn(96, 4, generator=g).to(dtype).T  # e.g. a transposed attention output
    with torch.inference_mode():
        torch.testing.assert_close(packed(noncontiguous), F.linear(noncontiguous, layer.weight, layer.bias),
                                   atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


def test_packing_is_cpu_only():
    assert not packing_works(torch.device("cuda"), torch.float32)


@needs_packing
def test_packed_forward_equals_the_model_modules(tiny):
    plain, packed = DecoderForward(tiny.model), DecoderForward(tiny.model, pack_weights=True)
    emb = torch.randn(4, tiny.spec.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.inference_mode():
        for a, b in zip(plain.prefix_kv(emb), packed.prefix_kv(emb)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        h = torch.randn(2, tiny.spec.hidden_size)
        torch.testing.assert_close(plain.logits(h), packed.logits(h), atol=1e-4, rtol=1e-4)


@needs_packing
@pytest.mark.parametrize("bias", [(False, False), (True, False), (True, True)])
def test_concatenated_linears_equal_each_one(bias):
    g = torch.Generator().manual_seed(3)
    parts = [torch.nn.Linear(32, n, bias=b) for n, b in zip((16, 8), bias)]
    x = torch.randn(2, 3, 32, generator=g)
    with torch.inference_mode():
        got = PackedLinear.concat(parts)(x).split([16, 8], dim=-1)
        for y, lin in zip(got, parts):
            torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-4)


def _stand_in_kernel(calls: list[int]):
    """A Python stand-in for the native bf16_linear (any rows, no bias): what PackedLinear routes to it is
    tested on every CPU, the kernel itself in tests/engine/."""
    def kernel(x, w):
        calls.append(x.shape[0])
        return F.linear(x.float(), w.float()).bfloat16()
    return kernel


@pytest.mark.parametrize("bias", [False, True])
def test_any_rows_needs_no_onednn_packing_and_adds_a_bias_after(monkeypatch, bias):
    """On AVX2-only CPUs oneDNN refuses to pack bf16 (and its bf16 F.linear is reference code): with any_rows no
    packed copy is made, so nothing of oneDNN's runs, and a biased linear (Qwen2's q/k/v) goes to the kernel
    too, its bias added to the kernel's result. The decode op, which adds no bias, is not offered its weight."""
    def refused(*args):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refused)
    g = torch.Generator().manual_seed(4)
    layer = torch.nn.Linear(64, 48, bias=bias).bfloat16()
    calls: list[int] = []
    packed = PackedLinear(layer, _stand_in_kernel(calls), any_rows=True)
    assert packed.weight is None
    assert (packed.small_batch_weight is None) == bias
    x = torch.randn(5, 64, generator=g).bfloat16()
    with torch.inference_mode():
        want = F.linear(x.float(), layer.weight.float()).bfloat16()
        if bias:
            want = want + layer.bias
        assert torch.equal(packed(x), want)
    assert calls == [5]


def test_any_rows_runs_a_weight_the_kernel_cannot_take_on_f_linear(monkeypatch):
    """k not a multiple of 32: not the kernel's; still no packed copy (oneDNN may refuse it), F.linear instead."""
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: pytest.fail("packed"))
    layer = torch.nn.Linear(40, 16, bias=True).bfloat16()
    calls: list[int] = []
    packed = PackedLinear(layer, _stand_in_kernel(calls), any_rows=True)
    x = torch.randn(3, 40).bfloat16()
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, layer.weight, layer.bias))
    assert calls == [] and packed.small_batch_weight is None
