"""Load the frozen base model once, on the chosen device and dtype."""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from app.engine import kernels
from app.model.families import UnsupportedModel, check_config
from app.model.source import resolve_checkpoint
from app.model.spec import ModelSpec, model_spec
from app.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    max_position_embeddings: int = 2048


def choose_device(requested: str) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """oneDNN's bf16 matmul runs natively here (AVX-512 BF16 or AMX); elsewhere it is emulated (AVX-512) or
    reference code (AVX2), and torch's bf16 ops run far below their float32 speed."""
    return bool({"avx512_bf16", "amx_bf16"} & kernels.cpu_flags())


def choose_dtype(requested: str, device: torch.device, bf16_kernels: Callable[[], bool] = lambda: False) -> torch.dtype:
    """bf16_kernels: whether the native kernels compute bfloat16 projections in float32 here (asked only on a CPU
    without AVX-512 BF16: it may build them)."""
    if requested and requested != "auto":
        try:
            return _DTYPES[requested.lower()]
        except KeyError:
            raise ValueError(f"PROMPTSERVE_DTYPE={requested!r}: use one of {sorted(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 decodes ~1.6x faster than fp32 on CPUs with AVX-512 BF16. On other AVX-512 CPUs oneDNN emulates it
    # at well under its float32 speed, and on AVX2-only ones it runs reference code (~1 GFLOP/s on a Zen 3
    # EPYC), but the native bf16_linear reads bf16 weights into float32 FMAs: float32's step speed x2.9 at
    # batch 1 and x1.2 at 64 on an Ice Lake, x2.8 and x1.5 on a Zen 3 EPYC (AVX2), in half the memory.
    # Elsewhere (no kernels: no compiler and no prebuilt level, or neither AVX2 nor AVX-512) float32.
    if cpu_has_native_bf16() or bf16_kernels():
        return torch.bfloat16
    return torch.float32


def served_device_and_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype load_model puts the model for these settings (nothing is loaded)."""
    device = choose_device(settings.device)
    return device, choose_dtype(settings.dtype, device, lambda: _native_bf16_linear(settings))


def _native_bf16_linear(settings: Settings) -> bool:
    """The engine's projections will run on the native bf16_linear (kernels/): the kernels build or load here,
    and the engine packs its weights (the kernel takes the place of the packed matmul). The kernels are loaded
    once per process: the engine reuses them."""
    return settings.native_kernels and settings.pack_weights and \
        kernels.load(settings.cache_dir).bf16_linear is not None


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """End-of-turn tokens: the generation config's eos ids, plus the tokenizer's own eos."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # ChatML templates open every turn with <|im_start|>: it never belongs inside an answer, and a model
    # that emits it instead of <|im_end|> has begun writing the next turn itself.
    template = getattr(tokenizer, "chat_template", None) or ""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>") if "<|im_start|>" in template else None
    if isinstance(start, int) and start != tokenizer.unk_token_id:
        ids.add(start)
    return frozenset(ids)


def max_positions(config) -> int:
    """The positions the model was made for (2048 where its config does not say)."""
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def served_context(config, max_model_len: int) -> int:
    """The context the server serves: the setting, at most the model's positions."""
    return min(max_model_len, max_positions(config))


def load_checkpoint(checkpoint: Path, device: torch.device, dtype: torch.dtype, max_model_len: int = 2048):
    """(model, tokenizer) of a local checkpoint: the model on device in dtype, in eval mode, frozen.
    A checkpoint the forward cannot serve exactly for max_model_len tokens is refused (UnsupportedModel)
    from its config alone, before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(checkpoint)
    check_config(config, served_context(config, max_model_len))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    state = read_safetensors(checkpoint, dtype)
    if state is None:  # no safetensors files (a .bin checkpoint): transformers reads it
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
        del state
        tied = {"lm_head.weight"} if model.lm_head.weight is model.get_input_embeddings().weight else set()
        missing = set(info["missing_keys"]) - tied
        if missing:  # transformers would have left them random: never serve that
            raise UnsupportedModel(f"{checkpoint}: weights missing from the checkpoint: {sorted(missing)[:5]}")
    model.to(device).eval()
    model.requires_grad_(False)  # frozen: only prompt parameters are ever trained
    return model, tokenizer


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def safetensors_header(f) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets; its metadata left out) and
    where their data starts, read from an open binary file at its beginning."""
    size = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_safetensors(checkpoint: Path, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Every tensor of the checkpoint's safetensors files, read with plain file reads into process memory
    (floating tensors converted to dtype one at a time); None when it has none.

    Not through a memory map, as transformers loads them: pages of a mapped file count in the process's
    memory while the mapping lives, and a tied embedding kept it alive, so a server that replaces the
    weights by packed copies still held every page it had read (two copies of an 8B model in 24 GB).
    Read this way, a weight replaced is a weight freed."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        return None
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with path.open("rb", buffering=0) as f:
            header, start = safetensors_header(f)
            for name, info in header.items():
                stored = SAFETENSORS_DTYPES.get(info["dtype"])
                if stored is None:
                    raise UnsupportedModel(f"{path.name}: tensor {name} is stored as {info['dtype']}, "
                                           f"not a floating-point type the forward computes in")
                tensor = torch.empty(info["shape"], dtype=stored)
                begin, end = info["data_offsets"]
                f.seek(start + begin)
                if tensor.numel() and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise OSError(f"{path}: truncated at tensor {name}")
                state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def load_model(settings: Settings) -> LoadedModel:
    checkpoint, name = resolve_checkpoint(settings.model, settings.cache_dir)
    device, dtype = served_device_and_dtype(settings)
    log.info("loading %s from %s on %s as %s", name, checkpoint, device, dtype)
    model, tokenizer = load_checkpoint(checkpoint, device, dtype, settings.max_model_len)
    spec = model_spec(model, name)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        dtype=dtype,
        stop_token_ids=stop_token_ids(model, tokenizer),
        max_position_embeddings=max_positions(model.config),
    )
