"""The native small-batch bfloat16 linear (app/engine/kernels/small_batch_linear.cpp) against F.linear:
SmolLM2's projection shapes and ragged ones, 1-4 rows; a row's result does not depend on the other rows;
the packed linear routes 1-2 rows to it and more to oneDNN; what it cannot take is refused by name."""

import pytest
import torch
import torch.nn.functional as F

from app.model.linear import SMALL_BATCH_ROWS, PackedLinear, packing_works


@pytest.fixture(scope="module")
def small(native_kernels):
    if native_kernels.small_batch_linear is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: projections stay on oneDNN")
    return native_kernels.small_batch_linear


def _close_to_linear(y, x, w):
    ref = F.linear(x.float(), w.float())
    # float32 sums of exact bf16 products, rounded once to bfloat16: within one bf16 step of the exact
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def _counting(kernel):
    """The kernel, and the list of the row counts it is called with."""
    calls = []

    def run(x, w):
        calls.append(x.shape[0])
        return kernel(x, w)
    return run, calls


# the small-batch kernel at 1-4 rows; bf16_linear (below) at any number of rows
@pytest.mark.parametrize("kernel,rows", [*[("small", r) for r in (1, 2, 3, 4)],
                                         *[("wide", r) for r in (1, 4, 5, 17, 64, 70)]])
@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (49, 64), (7, 32)])
def test_equals_linear_within_bf16_rounding(request, kernel, rows, n, k):
    run = request.getfixturevalue(kernel)
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    y = run(x, w)
    assert y.shape == (rows, n)
    _close_to_linear(y, x, w)


def test_a_row_does_not_depend_on_the_others(small):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 576, generator=g).bfloat16()
    w = torch.randn(200, 576, generator=g).bfloat16()
    together = small(x, w)
    assert all(torch.equal(together[i], small(x[i:i + 1], w)[0]) for i in range(4))


def test_refuses_what_it_cannot_take(small):
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        small(torch.randn(1, 64), w.float())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        small(torch.randn(1, 48).bfloat16(), torch.randn(8, 48).bfloat16())
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        small(torch.randn(5, 64).bfloat16(), w)


@pytest.mark.skipif(not packing_works(torch.device("cpu"), torch.bfloat16), reason="no oneDNN packing here")
def test_packed_linear_sends_small_batches_to_the_kernel(small):
    layer = torch.nn.Linear(576, 96, bias=False).bfloat16()
    counting, calls = _counting(small)
    packed = PackedLinear(layer, counting)
    with torch.inference_mode():
        for rows in range(1, 6):
            x = torch.randn(rows, 1, 576).bfloat16()
            y = packed(x)
            assert y.shape == (rows, 1, 96)
            _close_to_linear(y.view(rows, 96), x.view(rows, 576), layer.weight)
    assert calls == list(range(1, SMALL_BATCH_ROWS + 1))
    # a bias, or float32, stays on oneDNN
    assert PackedLinear(torch.nn.Linear(576, 96, bias=True).bfloat16(), counting)._small is None
    assert PackedLinear(torch.nn.Linear(576, 96, bias=False), counting)._small is None


def test_as_accurate_as_correct_rounding_nearly_always(small):
    """Exact bf16 products summed in float32: against the exact (float64) result rounded once to bf16,
    all but a sliver of outputs are the correctly rounded value (oneDNN's packed matmul measured 99.985%,
    this kernel 99.996%, on SmolLM2's own weights)."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1536, 576, generator=g) * 0.05).bfloat16()
    x = (torch.randn(2, 576, generator=g) * 0.5).bfloat16()
    exact = x.double() @ w.double().T
    assert (small(x, w) == exact.to(torch.bfloat16)).float().mean().item() >= 0.999


# bf16_linear: any number of rows, on AVX-512 CPUs without BF16 (the prebuilt "avx512" level is tested on every
# AVX-512 CPU in test_prebuilt_kernels.py)

@pytest.fixture(scope="module")
def wide(native_kernels):
    if native_kernels.bf16_linear is None:
        pytest.skip("this CPU has AVX-512 BF16 (oneDNN's bf16 matmul is native) or neither AVX-512 nor AVX2")
    return native_kernels.bf16_linear


@pytest.mark.parametrize("k", [576, 1568])  # 1568: 4 rows of x take k in spans (L1), 1 row in one
def test_bf16_linear_rows_are_the_same_at_any_batch_and_as_the_small_kernel(wide, small, k):
    """Each row is computed alone in one order: 1, 3 or 70 rows at a time, and the 1-4 row kernel, agree to
    the bit (so a request's tokens do not depend on what it is batched with, and speculation stays exact)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, k, generator=g).bfloat16()
    w = (torch.randn(200, k, generator=g) * 0.05).bfloat16()
    together = wide(x, w)
    assert torch.equal(together[:3], wide(x[:3], w))
    assert torch.equal(together[:4], small(x[:4], w))
    assert all(torch.equal(together[i], wide(x[i:i + 1], w)[0]) for i in (0, 5, 33, 69))


def test_bf16_linear_refuses_what_it_cannot_take(wide):
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        wide(torch.randn(2, 64), w)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        wide(torch.randn(9, 48).bfloat16(), torch.randn(8, 48).bfloat16())
    assert wide(torch.empty(0, 64).bfloat16(), w).shape == (0, 8)


def test_packed_linear_with_any_rows_sends_every_batch_and_holds_the_weight_once(wide):
    layer = torch.nn.Linear(576, 96, bias=False).bfloat16()
    counting, calls = _counting(wide)
    packed = PackedLinear(layer, counting, any_rows=True)
    assert packed.weight is None and packed.small_batch_weight.data_ptr() == layer.weight.data_ptr()
    with torch.inference_mode():
        for rows in (1, 2, 5, 64):
            x = torch.randn(rows, 576).bfloat16()
            _close_to_linear(packed(x), x, layer.weight)
    assert calls == [1, 2, 5, 64]
