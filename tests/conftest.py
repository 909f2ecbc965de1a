import pytest
import torch

from app.model.loader import load_model
from app.model.source import resolve_checkpoint
from app.settings import Settings


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory):
    """The embedded SmolLM2 converted to the local cache (once per machine)."""
    path, _ = resolve_checkpoint("", Settings().cache_dir)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_checkpoint):
    """A tiny random Llama with grouped-query attention, using the real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                         initializer_range=0.5)  # large weights: varied, non-degenerate greedy output
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    return load_model(Settings(model=str(tiny_model_dir), dtype="float32", device="cpu"))


@pytest.fixture(scope="session")
def smol():
    return load_model(Settings(dtype="float32", device="cpu"))
