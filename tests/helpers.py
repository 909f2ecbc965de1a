"""Shared test helpers: reference generation with plain transformers, prompt-set builders, engine runs."""

from __future__ import annotations

import asyncio
import hashlib

import torch
from transformers import DynamicCache

from app.engine.engine import Engine, EngineConfig
from app.engine.types import EngineRequest, PromptSetRef, SamplingParams
from prompt_store.format import PromptSet, PromptSetMeta


def greedy(n: int, **kw) -> SamplingParams:
    # eos stays active, as in transformers' generate: both stop on the same end-of-turn token.
    return SamplingParams(max_tokens=n, **kw)


@torch.no_grad()
def hf_generate_ids(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device))
    return out[0, len(ids):].tolist()


@torch.no_grad()
def hf_generate_embeds(model, embeddings: torch.Tensor, ids: list[int], n: int) -> list[int]:
    """The reference for an `input` prompt set: generate from inputs_embeds = [prompts; token embeddings]."""
    tok = model.get_input_embeddings()(torch.tensor([ids], device=model.device))
    embeds = torch.cat([embeddings.unsqueeze(0).to(tok.device, tok.dtype), tok], dim=1)
    out = model.generate(inputs_embeds=embeds,
                         attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device),
                         max_new_tokens=n, do_sample=False)
    return out[0].tolist()  # with inputs_embeds, generate returns only the new tokens


@torch.no_grad()
def hf_greedy_with_prefix(model, keys: torch.Tensor, values: torch.Tensor, ids: list[int], n: int) -> list[int]:
    """The reference for a `deep` prompt set: a transformers cache pre-filled with the prefix, greedy loop."""
    cache = DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].unsqueeze(0).to(model.device, model.dtype),
                     values[layer].unsqueeze(0).to(model.device, model.dtype), layer)
    p = keys.shape[2]
    x = torch.tensor([ids], device=model.device)
    pos = torch.arange(p, p + len(ids), device=model.device).unsqueeze(0)
    out = []
    for _ in range(n):
        mask = torch.ones(1, pos[0, -1].item() + 1, dtype=torch.long, device=model.device)
        logits = model(input_ids=x, past_key_values=cache, position_ids=pos, attention_mask=mask,
                       use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list) \
                else nxt == model.generation_config.eos_token_id:
            break
        x = torch.tensor([[nxt]], device=model.device)
        pos = pos[:, -1:] + 1
    return out


@torch.no_grad()
def text_prefix_kv(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The key/value cache of a real text, as [L, KVH, P, D] tensors."""
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    cache = out.past_key_values
    keys = torch.stack([cache.layers[i].keys[0] for i in range(len(cache.layers))])
    values = torch.stack([cache.layers[i].values[0] for i in range(len(cache.layers))])
    return keys.float().cpu(), values.float().cpu()


def input_prompt_set(spec, p: int, seed: int = 0, scale: float = 0.05, **meta) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(p, spec.hidden_size, generator=g) * scale
    return PromptSet(PromptSetMeta(kind="input", num_virtual_tokens=p, base_model=spec.fingerprint, **meta),
                     {"embeddings": emb})


def deep_prompt_set(spec, keys: torch.Tensor, values: torch.Tensor, **meta) -> PromptSet:
    return PromptSet(PromptSetMeta(kind="deep", num_virtual_tokens=keys.shape[2], base_model=spec.fingerprint,
                                   **meta), {"keys": keys, "values": values})


def random_deep_prompt_set(spec, p: int, seed: int = 0, scale: float = 1.0, **meta) -> PromptSet:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, spec.num_kv_heads, p, spec.head_dim)
    return deep_prompt_set(spec, torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale,
                           **meta)


def head_prompt_set(spec, task_type: str, labels, rows: int, seed: int = 0) -> PromptSet:
    """A random deep prompt set with a classify (rows = labels) or extract (rows = BIO tags) head."""
    base = random_deep_prompt_set(spec, 5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    tensors = {**base.tensors, "head.weight": torch.randn(rows, spec.hidden_size, generator=g),
               "head.bias": torch.randn(rows, generator=g)}
    return PromptSet(PromptSetMeta(kind="deep", num_virtual_tokens=5, task_type=task_type, labels=tuple(labels),
                                   base_model=spec.fingerprint), tensors)


def save_ref(tmp_path, name: str, ps: PromptSet, spec, version: int = 1) -> PromptSetRef:
    path = tmp_path / f"{name}-v{version}.safetensors"
    ps.save(path, spec)
    return PromptSetRef(name, version, str(path), ps.meta.num_virtual_tokens,
                        hashlib.sha256(path.read_bytes()).hexdigest())


def make_engine(loaded, **kw) -> Engine:
    config = EngineConfig(**{"max_num_seqs": 8, "max_model_len": 512, **kw})
    engine = Engine(loaded, config)
    engine.start()
    return engine


async def collect(engine: Engine, ids, sampling, ref=None):
    tokens, text, final = [], [], None
    async for out in engine.generate(EngineRequest(ids, sampling, ref)):
        tokens.extend(out.token_ids)
        text.append(out.text)
        final = out
    return tokens, "".join(text), final


def run(coro):
    return asyncio.run(coro)
