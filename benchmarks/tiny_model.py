"""A tiny random Llama (grouped-query attention, the embedded model's tokenizer and chat template): fast
enough for tests and soak runs on 2 cores, with varied, non-degenerate greedy output."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_model(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                         initializer_range=0.5)  # large weights: varied, non-degenerate greedy output
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Tiny random checkpoints of every family the forward serves (app/model/families.py), with the traits that
# set each apart: the tests check served tokens against transformers on each. Shared shape: 2 layers,
# hidden 64, 4 heads of 16 over 2 KV heads (grouped-query attention).
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.5,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def family_configs() -> dict[str, object]:
    """name -> a transformers config of that family's traits (vocab_size set by the builder)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    def llama_rope(rope: dict, **kw):
        return LlamaConfig(**_SHAPE, tie_word_embeddings=False, rope_parameters={"rope_theta": 10000.0, **rope}, **kw)

    return {
        # Llama 3.x: llama3 rope scaling, theta 500k, untied head
        "llama3": llama_rope({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        "llama-linear": llama_rope({"rope_type": "linear", "factor": 2.0}),
        "llama-dynamic": llama_rope({"rope_type": "dynamic", "factor": 2.0}),
        "llama-yarn": llama_rope({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
        # Llama 2 with q/k/v/o and MLP biases (attention_bias, mlp_bias), tied head
        "llama-bias": LlamaConfig(**_SHAPE, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        "mistral": MistralConfig(**_SHAPE, tie_word_embeddings=False, sliding_window=4096),
        "qwen2": Qwen2Config(**_SHAPE, tie_word_embeddings=True),  # q/k/v biases
        "qwen3": Qwen3Config(**_SHAPE, tie_word_embeddings=True),  # per-head q/k norms
        # scaled embeddings, (1 + w) norms, GELU (tanh)
        "gemma": GemmaConfig(**_SHAPE, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"),
        "phi3": Phi3Config(**_SHAPE, tie_word_embeddings=False),  # fused qkv_proj and gate_up_proj
        # Phi-4-mini's trait: only part of each head rotates
        "phi3-partial": Phi3Config(**_SHAPE, tie_word_embeddings=False, partial_rotary_factor=0.5),
    }


FAMILIES = tuple(family_configs())


def build_tiny_family(out: Path, tokenizer_dir: Path, name: str) -> Path:
    """A tiny random checkpoint of family `name` (see family_configs), saved with the embedded model's
    tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_configs()[name]
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if name == "gemma":  # zeros by default ((1 + w) norms): random ones so the trait shows in the output
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                torch.nn.init.normal_(param, std=0.3)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Real-size shapes of random checkpoints for memory and speed measurements (never shipped: made on the
# machine that measures). Llama-3.2-1B's and Llama-3-8B's layer shapes; the embedded model's tokenizer.
SHAPES = {
    # the measurement path in seconds (benchmarks/gpu_check.py on CPU, in the suite)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=10000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=500000.0),
}


def real_shape_model(shape: str, vocab_size: int, dtype: torch.dtype = torch.bfloat16,
                     device: str = "cpu") -> torch.nn.Module:
    """A random Llama of a real model's shape (SHAPES), made directly on `device` in `dtype` (weights std
    0.02, as trained models are scaled; on "meta" nothing is allocated), in eval mode and frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    theta = dims.pop("rope_theta")
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": theta}, **dims)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: an 8B model in float32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model.eval().requires_grad_(False)


def build_random_checkpoint(out: Path, tokenizer_dir: Path, shape: str, dtype: torch.dtype = torch.bfloat16,
                            device: str = "cpu") -> Path:
    """real_shape_model saved as a checkpoint with the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    real_shape_model(shape, len(tokenizer), dtype, device).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
