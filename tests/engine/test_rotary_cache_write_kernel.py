"""The native rotary + KV-cache write of a decode step (app/engine/kernels/rotary_cache_write.cpp): bit-identical
to transformers' apply_rotary_pos_emb and indexed cache writes, in float32 and bfloat16; rows and
positions outside the cache are refused, never written."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@pytest.fixture(scope="module")
def rope(native_kernels):
    return native_kernels.rotary_cache_write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh,d", [(9, 3, 64), (32, 8, 128), (4, 4, 16)])
def test_equals_transformers_rotary_and_cache_write(rope, dtype, h, kvh, d):
    g = torch.Generator().manual_seed(h * 100 + d)
    n, rows_total, length = 5, 8, 40
    qkv = (torch.randn(n, (h + 2 * kvh) * d, generator=g) * 4).to(dtype)
    angles = torch.rand(n, d // 2, generator=g) * 50
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    rows = torch.tensor([3, 0, 7, 1, 5])
    at = torch.tensor([0, 39, 12, 5, 21])
    k_cache = torch.randn(rows_total, kvh, length, d, generator=g).to(dtype)
    v_cache = torch.randn(rows_total, kvh, length, d, generator=g).to(dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    q = rope(qkv, cos, sin, k_cache, v_cache, rows, at, h, kvh)

    q_ref, k_ref, v_ref = qkv.view(n, 1, -1).split([h * d, kvh * d, kvh * d], dim=-1)
    q_ref = q_ref.view(n, 1, h, d).transpose(1, 2)
    k_ref = k_ref.view(n, 1, kvh, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos.unsqueeze(1), sin.unsqueeze(1))
    k_expected[rows, :, at] = k_ref[:, :, 0]
    v_expected[rows, :, at] = v_ref.view(n, kvh, d)
    assert torch.equal(q, q_ref[:, :, 0])
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)  # nothing else was touched


def test_writes_through_a_view_of_one_layer(rope):
    cache = torch.zeros(2, 3, 1, 4, 2)  # [layers, rows, kvh, length, d]
    qkv = torch.arange(2 * 3, dtype=torch.float32).view(1, 6)  # h = kvh = 1, d = 2
    ones, zeros = torch.ones(1, 2), torch.zeros(1, 2)
    rope(qkv, ones, zeros, cache[1], cache[1], torch.tensor([2]), torch.tensor([3]), 1, 1)
    assert cache[0].abs().sum() == 0 and cache[1, 2, 0, 3].tolist() == [4.0, 5.0]  # v written last


def test_refuses_positions_outside_the_cache(rope):
    k = torch.zeros(2, 1, 4, 2)
    qkv, cs = torch.zeros(1, 6), torch.zeros(1, 2)
    for rows, at in [([2], [0]), ([0], [4]), ([-1], [0])]:
        with pytest.raises(RuntimeError, match="outside the cache"):
            rope(qkv, cs, cs, k, k.clone(), torch.tensor(rows), torch.tensor(at), 1, 1)
    with pytest.raises(RuntimeError, match="int64"):
        rope(qkv, cs, cs, k, k.clone(), torch.tensor([0], dtype=torch.int32), torch.tensor([0]), 1, 1)
