"""Convert a Hugging Face PEFT prompt-learning adapter into a promptserve prompt set.

PROMPT_TUNING and P_TUNING adapters save ``prompt_embeddings`` [P, hidden] (P-Tuning's encoder already
applied) -> kind ``input``. PREFIX_TUNING saves ``prompt_embeddings`` [P, num_layers * 2 * kv_dim] with
kv_dim = num_kv_heads * head_dim (PEFT sizes prefixes by KV heads for grouped-query attention) -> kind
``deep``. PEFT reshapes it to [P, 2L, KVH, D] and permutes to per-layer (key, value) pairs, layer i
taking rows 2i (key) and 2i+1 (value); we do the same once, here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from prompt_store.format import BaseModelShape, PromptSet, PromptSetError, PromptSetMeta, check_compatible

INPUT_TYPES = {"PROMPT_TUNING", "P_TUNING"}
DEEP_TYPES = {"PREFIX_TUNING"}


def _read_adapter(adapter_dir: Path) -> tuple[dict, torch.Tensor]:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise PromptSetError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
    config = json.loads(config_path.read_text())
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        weights = load_file(str(st))
    elif (adapter_dir / "adapter_model.bin").is_file():
        weights = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PromptSetError(f"{adapter_dir} has no adapter_model.safetensors")
    key = next((k for k in weights if k.endswith("prompt_embeddings")), None)
    if key is None:
        raise PromptSetError(f"adapter weights lack 'prompt_embeddings' (found {sorted(weights)[:5]})")
    return config, weights[key].float()


def import_peft(adapter_dir: str | Path, shape: BaseModelShape, base_model_name: str = "",
                task_type: str = "generate") -> PromptSet:
    adapter_dir = Path(adapter_dir)
    config, emb = _read_adapter(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    p = int(config.get("num_virtual_tokens") or emb.shape[0])
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise PromptSetError("encoder-decoder adapters (num_transformer_submodules=2) are not supported")
    if emb.shape[0] != p:
        raise PromptSetError(f"prompt_embeddings has {emb.shape[0]} rows, config says {p} virtual tokens")
    meta = dict(num_virtual_tokens=p, task_type=task_type, base_model=shape.fingerprint,
                base_model_name=base_model_name,
                description=f"imported from PEFT {peft_type} adapter {adapter_dir.name}",
                extra={"peft_type": peft_type, "peft_base_model": config.get("base_model_name_or_path") or ""})
    if peft_type in INPUT_TYPES:
        ps = PromptSet(PromptSetMeta(kind="input", **meta), {"embeddings": emb.contiguous()})
    elif peft_type in DEEP_TYPES:
        L, kvh, d = shape.num_layers, shape.num_kv_heads, shape.head_dim
        if emb.shape[1] != L * 2 * kvh * d:
            raise PromptSetError(
                f"prefix width {emb.shape[1]} != num_layers*2*num_kv_heads*head_dim = {L * 2 * kvh * d}")
        kv = emb.view(p, 2 * L, kvh, d).permute(1, 2, 0, 3)  # [2L, KVH, P, D]
        ps = PromptSet(PromptSetMeta(kind="deep", **meta),
                       {"keys": kv[0::2].contiguous(), "values": kv[1::2].contiguous()})
    else:
        raise PromptSetError(f"peft_type {peft_type!r} is not a prompt-learning type "
                             f"({sorted(INPUT_TYPES | DEEP_TYPES)})")
    check_compatible(ps, shape)
    return ps
