"""One prompt set = one self-describing .safetensors file.

Tensors
  input: ``embeddings`` [P, hidden] -- virtual-token embeddings prepended to the input embeddings.
  deep:  ``keys`` and ``values`` [num_layers, num_kv_heads, P, head_dim] -- per-layer key/value prefixes,
         used exactly as a key/value cache of P earlier positions (keys already rotated, as in a cache).
  Optional ``head.*`` tensors belong to a task head (classification) and are validated by their user.

Metadata (safetensors string map): format, kind, num_virtual_tokens, task_type, labels (JSON list),
base_model (fingerprint of the base weights), base_model_name, and the base model's dimensions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "promptserve.prompt-set.v1"
KINDS = ("input", "deep")
TASK_TYPES = ("generate", "classify", "extract")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_VIRTUAL_TOKENS = 4096
MAX_ABS_VALUE = 65504.0  # float16's largest finite value
MAX_HEADER_BYTES = 1 << 20  # a prompt set's JSON header: a few tensors and a short metadata map


class PromptSetError(ValueError):
    """A prompt-set file that cannot be served; the message says what is wrong."""


class BaseModelShape(Protocol):
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str


@dataclass(frozen=True)
class PromptSetMeta:
    kind: str
    num_virtual_tokens: int
    task_type: str = "generate"
    labels: tuple[str, ...] = ()
    base_model: str = ""
    base_model_name: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def to_header(self, shape: BaseModelShape | None = None) -> dict[str, str]:
        header = {
            "format": FORMAT,
            "kind": self.kind,
            "num_virtual_tokens": str(self.num_virtual_tokens),
            "task_type": self.task_type,
            "labels": json.dumps(list(self.labels)),
            "base_model": self.base_model,
            "base_model_name": self.base_model_name,
            "description": self.description,
            "extra": json.dumps(self.extra, sort_keys=True),
        }
        if shape is not None:
            header.update(num_layers=str(shape.num_layers), hidden_size=str(shape.hidden_size),
                          num_kv_heads=str(shape.num_kv_heads), head_dim=str(shape.head_dim))
        return header

    @classmethod
    def from_header(cls, header: dict[str, str] | None) -> "PromptSetMeta":
        if not header or header.get("format") != FORMAT:
            raise PromptSetError(f"not a promptserve prompt set: metadata 'format' must be {FORMAT!r}")
        try:
            kind = header["kind"]
            p = int(header["num_virtual_tokens"])
            task_type = header.get("task_type", "generate")
            labels = json.loads(header.get("labels") or "[]")
            extra = json.loads(header.get("extra") or "{}")
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise PromptSetError(f"malformed prompt-set metadata: {type(exc).__name__}: {exc}") from None
        if not isinstance(labels, list):  # a string would otherwise become one label per character
            raise PromptSetError(f"metadata 'labels' must be a JSON list of strings, got {type(labels).__name__}")
        labels = tuple(labels)
        if kind not in KINDS:
            raise PromptSetError(f"kind {kind!r} is not one of {list(KINDS)}")
        if task_type not in TASK_TYPES:
            raise PromptSetError(f"task_type {task_type!r} is not one of {list(TASK_TYPES)}")
        if not 1 <= p <= MAX_VIRTUAL_TOKENS:
            raise PromptSetError(f"num_virtual_tokens must be 1..{MAX_VIRTUAL_TOKENS}, got {p}")
        if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
            raise PromptSetError("labels must be distinct non-empty strings")
        if task_type == "classify" and len(labels) < 2:
            raise PromptSetError("a classify prompt set needs at least two labels")
        return cls(kind=kind, num_virtual_tokens=p, task_type=task_type, labels=labels,
                   base_model=header.get("base_model", ""), base_model_name=header.get("base_model_name", ""),
                   description=header.get("description", ""), extra=extra if isinstance(extra, dict) else {})


@dataclass
class PromptSet:
    meta: PromptSetMeta
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.meta.kind

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self, shape: BaseModelShape | None = None) -> bytes:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return st_save(tensors, metadata=self.meta.to_header(shape))

    def save(self, path: str | Path, shape: BaseModelShape | None = None) -> None:
        Path(path).write_bytes(self.to_bytes(shape))


def parse(data: bytes) -> PromptSet:
    """Decode and check a prompt set on its own (model-independent checks)."""
    if len(data) < 8:
        raise PromptSetError("not a safetensors file: shorter than its 8-byte header length")
    try:
        header = header_of(data)
        tensors = st_load(data)
    except PromptSetError:
        raise
    except Exception as exc:  # hostile bytes reach here: whatever the decoder raises, the file is invalid
        raise PromptSetError(f"not a valid safetensors file: {type(exc).__name__}: {exc}") from None
    meta = PromptSetMeta.from_header(header)
    ps = PromptSet(meta=meta, tensors=tensors)
    _check_tensors(ps)
    return ps


def load(path: str | Path) -> PromptSet:
    return parse(Path(path).read_bytes())


def header_of(data: bytes) -> dict[str, str]:
    """The metadata map of a safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data) or n > MAX_HEADER_BYTES:
        raise PromptSetError("not a valid safetensors file: header length out of range")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError) as exc:
        raise PromptSetError(f"not a valid safetensors file: unreadable header: {type(exc).__name__}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise PromptSetError("not a valid safetensors file: '__metadata__' must map strings to strings")
    return meta or {}


def _expected_names(kind: str) -> set[str]:
    return {"embeddings"} if kind == "input" else {"keys", "values"}


def _check_tensors(ps: PromptSet) -> None:
    expected = _expected_names(ps.kind)
    names = set(ps.tensors)
    missing = expected - names
    if missing:
        raise PromptSetError(f"a {ps.kind} prompt set needs tensors {sorted(expected)}; missing {sorted(missing)}")
    unknown = {n for n in names - expected if not n.startswith("head.")}
    if unknown:
        raise PromptSetError(f"unexpected tensors {sorted(unknown)}")
    p = ps.meta.num_virtual_tokens
    for name, t in ps.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise PromptSetError(f"tensor {name!r} has dtype {t.dtype}; use float32, bfloat16 or float16")
        if not torch.isfinite(t).all():
            raise PromptSetError(f"tensor {name!r} contains NaN or infinite values")
        # finite in every model dtype (float16's range is the narrowest): a value that overflows to inf
        # in the served dtype would turn its requests' logits into NaN
        if t.numel() and t.abs().max() > MAX_ABS_VALUE:
            raise PromptSetError(f"tensor {name!r} has values beyond +-{MAX_ABS_VALUE:g}")
    if ps.kind == "input":
        e = ps.tensors["embeddings"]
        if e.dim() != 2 or e.shape[0] != p:
            raise PromptSetError(f"embeddings must be [num_virtual_tokens={p}, hidden], got {list(e.shape)}")
    else:
        k, v = ps.tensors["keys"], ps.tensors["values"]
        if k.shape != v.shape:
            raise PromptSetError(f"keys {list(k.shape)} and values {list(v.shape)} differ in shape")
        if k.dim() != 4 or k.shape[2] != p:
            raise PromptSetError(
                f"keys/values must be [num_layers, num_kv_heads, num_virtual_tokens={p}, head_dim], "
                f"got {list(k.shape)}")


def head_rows(meta: PromptSetMeta) -> int | None:
    """Rows of the task head: one per label (classify), one per BIO tag (extract: O, then B-/I- per type)."""
    if meta.task_type == "classify":
        return len(meta.labels)
    if meta.task_type == "extract":
        return 1 + 2 * len(meta.labels)
    return None


def _check_head(ps: PromptSet, shape: BaseModelShape) -> None:
    rows = head_rows(ps.meta)
    w, b = ps.tensors.get("head.weight"), ps.tensors.get("head.bias")
    if rows is None:
        if w is not None or b is not None:
            raise PromptSetError(f"a {ps.meta.task_type} prompt set has no head, but head tensors are present")
        return
    if ps.meta.task_type == "extract" and not ps.meta.labels:
        raise PromptSetError("an extract prompt set needs its entity types as labels")
    if w is None or list(w.shape) != [rows, shape.hidden_size]:
        raise PromptSetError(f"a {ps.meta.task_type} prompt set needs head.weight [{rows}, {shape.hidden_size}], "
                             f"got {None if w is None else list(w.shape)}")
    if b is not None and list(b.shape) != [rows]:
        raise PromptSetError(f"head.bias must be [{rows}], got {list(b.shape)}")


def check_compatible(ps: PromptSet, shape: BaseModelShape) -> None:
    """Refuse a prompt set made for another base model, or whose shapes do not fit this one."""
    if ps.meta.base_model and ps.meta.base_model != shape.fingerprint:
        raise PromptSetError(
            f"prompt set was trained for base model {ps.meta.base_model} "
            f"({ps.meta.base_model_name or 'unnamed'}), this server runs {shape.fingerprint}")
    if not ps.meta.base_model:
        raise PromptSetError("prompt set metadata lacks the base-model fingerprint ('base_model')")
    if ps.kind == "input":
        hidden = ps.tensors["embeddings"].shape[1]
        if hidden != shape.hidden_size:
            raise PromptSetError(f"embeddings have hidden size {hidden}, the model has {shape.hidden_size}")
    else:
        want = [shape.num_layers, shape.num_kv_heads, ps.meta.num_virtual_tokens, shape.head_dim]
        got = list(ps.tensors["keys"].shape)
        if got != want:
            raise PromptSetError(
                f"keys/values are {got}; this model needs [num_layers={want[0]}, num_kv_heads={want[1]}, "
                f"num_virtual_tokens={want[2]}, head_dim={want[3]}]")
    _check_head(ps, shape)


def parse_for_model(data: bytes, shape: BaseModelShape) -> PromptSet:
    ps = parse(data)
    check_compatible(ps, shape)
    return ps
