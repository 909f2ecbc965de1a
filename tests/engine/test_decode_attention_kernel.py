"""The native decode-attention kernel (app/engine/kernels) against torch's SDPA with the engine's mask:
float32 and bfloat16, strided views of a cache, rows of different lengths, grouped queries of the shapes
the kernel specializes and of others; and a row's result does not depend on the rest of its batch."""

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def kernel(native_kernels):
    return native_kernels.decode_attention


def reference(q, k, v, lengths, scale):
    width = k.shape[2]
    allowed = torch.arange(width).view(1, 1, 1, width) <= lengths.view(-1, 1, 1, 1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kvh,group,head_dim", [(3, 3, 64), (2, 4, 128), (2, 1, 64), (2, 2, 16), (1, 5, 24)])
def test_equals_sdpa_on_a_strided_cache_view(kernel, dtype, tolerance, kvh, group, head_dim):
    torch.manual_seed(kvh * 100 + group * 10 + head_dim)
    rows, max_len, n, width = 9, 97, 7, 61
    cache_k = torch.randn(rows, kvh, max_len, head_dim, dtype=dtype)
    cache_v = torch.randn(rows, kvh, max_len, head_dim, dtype=dtype)
    k, v = cache_k[:n, :, :width], cache_v[:n, :, :width]  # views, as the engine passes them
    q = torch.randn(n, kvh, group, head_dim, dtype=dtype)
    lengths = torch.tensor([0, 1, 5, 30, 59, 60, 17])  # the last position a row sees; 0 = only one
    scale = head_dim ** -0.5
    out = kernel(q, k, v, lengths, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - reference(q, k, v, lengths, scale)).abs().max().item() < tolerance


def test_a_row_does_not_depend_on_its_batch(kernel):
    torch.manual_seed(0)
    k, v = torch.randn(2, 8, 3, 50, 64, dtype=torch.bfloat16).unbind(0)
    q = torch.randn(8, 3, 3, 64, dtype=torch.bfloat16)
    lengths = torch.randint(0, 50, (8,))
    batch = kernel(q, k, v, lengths, 0.125)
    alone = torch.cat([kernel(q[i:i + 1], k[i:i + 1], v[i:i + 1], lengths[i:i + 1], 0.125) for i in range(8)])
    assert torch.equal(batch, alone)


def test_refuses_what_it_cannot_read(kernel):
    q = torch.randn(2, 3, 3, 64)
    k = torch.randn(2, 3, 10, 64)
    with pytest.raises(RuntimeError, match="lengths"):
        kernel(q, k, k, torch.tensor([1, 2], dtype=torch.int32), 0.125)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        kernel(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, torch.tensor([1, 2]), 0.125)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_prefill_queries_read_their_own_rows(kernel, dtype, tolerance):
    """With rows, each query (a prefill's token) reads its own sequence's cache row up to its own
    position: the same as each sequence's causal attention."""
    torch.manual_seed(1)
    kvh, group, d, width = 3, 3, 64, 40
    cache_k = torch.randn(4, kvh, 50, d, dtype=dtype)
    cache_v = torch.randn(4, kvh, 50, d, dtype=dtype)
    k, v = cache_k[1:4, :, :width], cache_v[1:4, :, :width]  # a batch's rows in the cache
    rows = torch.tensor([0, 0, 0, 2, 2, 1])  # three tokens of sequence 0, two of 2, one of 1
    positions = torch.tensor([16, 17, 18, 30, 31, 39])  # after a 16-token prefix, say
    q = torch.randn(len(rows), kvh, group, d, dtype=dtype)
    out = kernel(q, k, v, positions, d ** -0.5, rows)
    expected = torch.cat([reference(q[i:i + 1], k[r:r + 1], v[r:r + 1], positions[i:i + 1], d ** -0.5)
                          for i, r in enumerate(rows.tolist())])
    assert (out.float() - expected).abs().max().item() < tolerance
    with pytest.raises(RuntimeError, match="rows outside k"):
        kernel(q, k, v, positions, d ** -0.5, torch.tensor([0, 0, 0, 2, 3, 1]))
