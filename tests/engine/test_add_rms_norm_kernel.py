"""The native residual add + RMSNorm (app/engine/kernels/add_rms_norm.cpp) against the model's own
LlamaRMSNorm in bfloat16; the forward pass with it equals the model's own (to bf16 rounding)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from app.model.forward import DecoderForward
from app.model.loader import load_model
from app.settings import Settings


@pytest.fixture(scope="module")
def add_rms_norm(native_kernels):
    return native_kernels.add_rms_norm


@pytest.mark.parametrize("shape", [(1, 1, 576), (64, 1, 576), (3, 7, 48)])
def test_equals_add_then_llama_rms_norm(add_rms_norm, shape):
    g = torch.Generator().manual_seed(shape[0])
    x = (torch.randn(shape, generator=g) * 3).bfloat16()
    delta = torch.randn(shape, generator=g).bfloat16()
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(shape[-1], generator=g))
    norm = norm.bfloat16()
    total, normed = add_rms_norm(x, delta, norm.weight, 1e-5)
    assert torch.equal(total, x + delta)  # the same bf16 rounding of the sum
    with torch.inference_mode():
        expected = norm(x + delta)
    # only the mean's float32 summation order differs: at most one bf16 step, and rarely
    step = expected.float().abs() * 2 ** -7 + 1e-6
    assert ((normed.float() - expected.float()).abs() <= step).all()
    assert (normed != expected).float().mean().item() < 0.02


def test_refuses_what_it_cannot_take(add_rms_norm):
    w = torch.ones(8).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), w, 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        add_rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16(), torch.ones(4).bfloat16(), 1e-5)


def test_forward_pass_with_it_equals_the_models_own(add_rms_norm, tiny_model_dir):
    """Norm weights made distinct per layer, so that a norm applied at the wrong place shows."""
    model = load_model(Settings(model=str(tiny_model_dir), dtype="bfloat16", device="cpu")).model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]:
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=g)
    forward = DecoderForward(model, add_rms_norm=add_rms_norm)
    mask = forward.group_mask(torch.ones(12, 12, dtype=torch.bool).tril().unsqueeze(0), torch.bfloat16)
    with torch.inference_mode():
        ours = forward.logits(forward.hidden(forward.embed(ids), torch.arange(12).unsqueeze(0),
                                             lambda i, q, k, v: forward.grouped_attention(q, k, v, mask)))
        theirs = model(ids).logits.float()
    assert (ours - theirs).abs().max().item() < 0.05 * theirs.abs().max().item()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
