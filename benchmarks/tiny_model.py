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
