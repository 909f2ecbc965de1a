import pytest
import torch

from prompt_store import format as psf
from prompt_store.format import PromptSet, PromptSetError, PromptSetMeta
from tests.helpers import input_prompt_set, random_deep_prompt_set


def test_roundtrip_keeps_tensors_and_metadata(tiny):
    ps = input_prompt_set(tiny.spec, 5, task_type="generate", description="demo")
    back = psf.parse_for_model(ps.to_bytes(tiny.spec), tiny.spec)
    assert back.meta == ps.meta
    torch.testing.assert_close(back.tensors["embeddings"], ps.tensors["embeddings"])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"hello, not a safetensors file", "not a valid safetensors"),
    (lambda b: b[: len(b) // 2], "not a valid safetensors"),
    (lambda b: b"", "shorter than"),
])
def test_broken_bytes_are_refused(tiny, mutate, message):
    data = input_prompt_set(tiny.spec, 4).to_bytes(tiny.spec)
    with pytest.raises(PromptSetError, match=message):
        psf.parse(mutate(data))


def _with(spec, kind="input", **tensors):
    p = next(iter(tensors.values())).shape[0 if kind == "input" else 2]
    return PromptSet(PromptSetMeta(kind=kind, num_virtual_tokens=p, base_model=spec.fingerprint), tensors)


def test_wrong_shapes_nan_dtype_and_model_are_refused(tiny):
    spec = tiny.spec
    cases = [
        (_with(spec, embeddings=torch.zeros(4, spec.hidden_size + 1)), "hidden size"),
        (_with(spec, embeddings=torch.full((4, spec.hidden_size), float("nan"))), "NaN"),
        (_with(spec, embeddings=torch.zeros(4, spec.hidden_size, dtype=torch.int32)), "dtype"),
        (_with(spec, "deep", keys=torch.zeros(spec.num_layers + 1, spec.num_kv_heads, 3, spec.head_dim),
               values=torch.zeros(spec.num_layers + 1, spec.num_kv_heads, 3, spec.head_dim)), "num_layers"),
        (_with(spec, "deep", keys=torch.zeros(spec.num_layers, spec.num_kv_heads, 3, spec.head_dim),
               values=torch.zeros(spec.num_layers, spec.num_kv_heads, 3, spec.head_dim + 1)), "differ"),
    ]
    for ps, message in cases:
        with pytest.raises(PromptSetError, match=message):
            psf.parse_for_model(ps.to_bytes(), spec)
    other = input_prompt_set(spec, 3)
    other = PromptSet(PromptSetMeta(kind="input", num_virtual_tokens=3, base_model="0123456789abcdef"),
                      other.tensors)
    with pytest.raises(PromptSetError, match="trained for base model"):
        psf.parse_for_model(other.to_bytes(), spec)


def test_metadata_is_checked(tiny):
    ps = input_prompt_set(tiny.spec, 3)
    header = ps.meta.to_header()
    for key, value, message in [("kind", "shallow", "kind"), ("num_virtual_tokens", "0", "num_virtual_tokens"),
                                ("task_type", "dance", "task_type"), ("format", "x", "not a promptserve")]:
        with pytest.raises(PromptSetError, match=message):
            PromptSetMeta.from_header({**header, key: value})


def test_deep_prompt_set_validates_against_gqa_shape(tiny):
    ps = random_deep_prompt_set(tiny.spec, 6)
    assert psf.parse_for_model(ps.to_bytes(), tiny.spec).kind == "deep"
