"""What differs between the decoder families the forward serves, in one table, and the check that refuses
the rest at start.

Every supported family is a pre-norm decoder with rotary positions, grouped-query attention and a gated
MLP; they differ only in the traits below (read against transformers' `modeling_<family>.py`). A
checkpoint whose architecture or features the forward does not implement is refused before its weights
are loaded: served approximately, it would answer plausibly and wrongly without a word.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    # "llama": weight * normalize(x).to(dtype); "gemma": (normalize(x) * (1 + weight)) in float32, then dtype
    norm: str = "llama"
    # each head's query and key RMS-normalized before the rotary embedding (Qwen3's q_norm / k_norm)
    qk_norm: bool = False
    # the attention module's projections of q, k, v in that order: three modules, or one fused (Phi-3)
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    # the MLP's gate and up projections: two modules, or one fused [gate; up] (Phi-3)
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    act: str = "act_fn"  # the MLP's activation attribute (GELU for Gemma, SiLU for the others)


# model_type (config.json) -> traits. Gemma's sqrt(hidden) embedding scale lives in its embedding module
# (GemmaTextScaledWordEmbedding), which the forward calls, so it needs no trait.
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "gemma": Family(norm="gemma"),
    "phi3": Family(qkv=("qkv_proj",), gate_up=("gate_up_proj",), act="activation_fn"),
}

# families known and refused, with what the forward lacks for them
REFUSED_FAMILIES: dict[str, str] = {
    "gemma2": "attention-logit and final-logit soft-capping, alternating sliding-window layers and "
              "post-sublayer norms are not implemented",
    "gemma3": "alternating sliding-window layers, per-layer rotary bases and post-sublayer norms are not "
              "implemented",
    "gemma3_text": "alternating sliding-window layers, per-layer rotary bases and post-sublayer norms are not "
                   "implemented",
}

# rotary scalings computed by the model's own rotary module; the dynamic ones only where they never move
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
DYNAMIC_ROPE = {"dynamic", "longrope"}  # frequencies change once a sequence passes the original length


class UnsupportedModel(ValueError):
    """A checkpoint the forward cannot serve exactly; the message is one line naming what and why."""


def supported_list() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of(config) -> Family:
    """The traits of a config's family; UnsupportedModel for any other architecture."""
    model_type = getattr(config, "model_type", None)
    architecture = ",".join(getattr(config, "architectures", None) or []) or model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = REFUSED_FAMILIES.get(model_type, "not implemented by the forward")
    raise UnsupportedModel(f"architecture {architecture} (model_type {model_type!r}) is not supported: {why}; "
                           f"supported model types: {supported_list()}")


def check_config(config, max_model_len: int) -> Family:
    """Refuse what the family's forward does not implement for a served context of max_model_len tokens
    (prompt-set prefix, prompt and generated tokens); return the family's traits."""
    family = family_of(config)
    name = f"{config.model_type} checkpoint"

    def refuse(feature: str) -> None:
        raise UnsupportedModel(f"{name}: {feature}; supported model types: {supported_list()} with full "
                               f"attention over the served context")

    if getattr(config, "quantization_config", None):
        method = dict(config.quantization_config).get("quant_method", "quantized")
        refuse(f"{method} quantized weights are not supported (serve the unquantized checkpoint)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if (getattr(config, key, None) or 0) > 1:
            refuse(f"mixture-of-experts layers ({key}={getattr(config, key)}) are not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            refuse(f"{key} is not implemented")
    window = _sliding_window(config)
    if window is not None and window < max_model_len:
        # a window at least as long as the context never hides a token: full attention computes the same
        refuse(f"a sliding attention window of {window} tokens is shorter than the served context of "
               f"{max_model_len} tokens; set PROMPTSERVE_MAX_MODEL_LEN={window} or less")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type in DYNAMIC_ROPE:
        # dynamic: transformers rescales once a sequence passes max_position_embeddings
        original = config.max_position_embeddings if rope_type == "dynamic" else \
            rope.get("original_max_position_embeddings") or config.max_position_embeddings
        if max_model_len > original:
            refuse(f"{rope_type} rotary scaling changes its frequencies past {original} tokens, and keys "
                   f"cached before would disagree with it; set PROMPTSERVE_MAX_MODEL_LEN={original} or less")
    elif rope_type not in STATIC_ROPE:
        refuse(f"rotary scaling {rope_type!r} is not supported (supported: "
               f"{', '.join(sorted(STATIC_ROPE | DYNAMIC_ROPE))})")
    return family


def _sliding_window(config) -> int | None:
    """The shortest window any layer attends within, None for full attention everywhere."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2/Qwen3: a window configured for no layer (use_sliding_window off)
    return int(window)
