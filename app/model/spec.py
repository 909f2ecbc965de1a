"""The shape facts of a base model that prompt sets must match, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


def model_spec(model: torch.nn.Module, name: str) -> ModelSpec:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dims = {
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
    }
    return ModelSpec(name=name, fingerprint=fingerprint(model, {**dims, **_architecture(cfg)}), **dims)


def _architecture(cfg) -> dict:
    """What besides the shapes makes the same embeddings a different model: the family, and a rotary scaling
    (Llama 3 and 3.1 differ only there) or a partial rotary factor. Each enters the fingerprint only where it
    is not plain Llama's, so the fingerprints of sets made before this was hashed (the shipped SmolLM2 sets)
    stay what they were."""
    extra = {}
    if getattr(cfg, "model_type", "llama") != "llama":
        extra["model_type"] = cfg.model_type
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if (rope.get("rope_type") or "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        extra["rope"] = {k: rope[k] for k in sorted(rope)}
    return extra


def fingerprint(model: torch.nn.Module, dims: dict) -> str:
    """Identify the base weights a prompt set was trained for, whatever dtype they are loaded in.

    Shapes alone cannot tell a base model from its instruct sibling, so a slice of the token
    embeddings is hashed too. Rounding it to bfloat16 first makes float32 and bfloat16 loads of the
    same checkpoint agree (bf16 -> fp32 -> bf16 is exact, and fp32 -> bf16 rounding is deterministic).
    """
    emb = model.get_input_embeddings().weight.detach()[:64].to("cpu", torch.bfloat16).contiguous()
    h = hashlib.sha256(json.dumps(dims, sort_keys=True).encode())
    h.update(emb.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
