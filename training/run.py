"""`promptserve train`: load the frozen base, train a prompt set, write it as a servable file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from app.model.loader import choose_device, choose_dtype, load_checkpoint
from app.model.spec import model_spec
from app.settings import DEMO_PROMPT_SETS
from prompt_store import format as psf
from prompt_store.format import PromptSetMeta
from training.data import build_examples, read_jsonl
from training.presets import PRESETS
from training.trainer import TrainConfig, train

log = logging.getLogger(__name__)


def demo_rows(name: str, limit: int | None = None) -> list[dict]:
    preset = PRESETS[name]
    rows = [r for path in preset["data"] for r in read_jsonl(path)]
    if preset.get("extra"):
        rows += read_jsonl(preset["extra"]) * preset.get("extra_repeat", 1)
    return rows[:limit] if limit else rows


def run_training(checkpoint: Path, name: str, out: Path, kind: str | None, rows: list[dict], cfg: TrainConfig,
                 device: torch.device, dtype: torch.dtype, base_name: str, description: str = "",
                 progress: bool = True) -> dict:
    full = cfg.full_finetune
    # Prompt training runs the frozen base in `dtype` (bf16 on this CPU); full fine-tuning keeps float32
    # master weights and computes in bf16 under autocast.
    model, tokenizer = load_checkpoint(checkpoint, device, torch.float32 if full else dtype)
    spec = model_spec(model, base_name)
    examples = build_examples(tokenizer, rows, cfg.task_type, cfg.labels)
    evaluate = _dev_evaluator(name, tokenizer, device) if cfg.select_on_dev else None
    result = train(model, spec, tokenizer, examples, cfg, device, progress=progress,
                   autocast_dtype=dtype if full and dtype != torch.float32 else None, evaluate=evaluate)
    tail = max(1, min(20, len(result.losses) // 4))  # mean of the last quarter, at most 20 steps
    stats = {"task": name, "kind": kind or "full-finetune", "trainable_params": result.trainable_params,
             "train_seconds": round(result.seconds, 1), "train_tokens": result.tokens,
             "steps": len(result.losses), "first_loss": result.losses[0],
             "final_loss": sum(result.losses[-tail:]) / tail, "device": str(device), "dtype": str(dtype)}
    if result.dev_scores:
        stats.update(dev_scores=result.dev_scores, kept_step=result.kept_step)
    if not full:
        meta = PromptSetMeta(kind=kind, num_virtual_tokens=cfg.num_virtual_tokens, task_type=cfg.task_type,
                             labels=tuple(cfg.labels), base_model=spec.fingerprint, base_model_name=base_name,
                             description=description, extra={"training": stats})
        ps = result.module.export(meta)
        psf.check_compatible(ps, spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        ps.save(out, spec)
        stats["out"] = str(out)
    return {"stats": stats, "module": result.module, "model": model, "tokenizer": tokenizer, "spec": spec}


def _dev_evaluator(name: str, tokenizer, device: torch.device):
    """The demo task's dev score of a module (higher is better), for selecting the best epoch."""
    if name not in PRESETS:
        raise ValueError("selecting on dev needs a demo task (its dev split)")
    from training.evaluate import dev_score  # evaluation's imports only when it runs

    return lambda module: dev_score(module, tokenizer, name, device)


def _init_text(preset: dict, kind: str | None, reparam: bool, given: str | None) -> str:
    """The text a prompt starts from: the one given, else the preset's. Deep sets start from its keys and
    values, which cannot be put through the reparameterization MLP: the preset's is then dropped, a given
    one refused."""
    if kind is None:
        return ""
    if kind == "deep" and reparam:
        if given:
            raise ValueError("an init text cannot start a deep set trained with reparameterization")
        return ""
    return preset.get("init_text", "") if given is None else given


def config_for(name: str | None, kind: str | None, *, lr: float | None = None, task_type: str | None = None,
               labels: list[str] | None = None, virtual_tokens: int | None = None, reparam: bool = False,
               epochs: float | None = None, batch_size: int | None = None, seed: int = 0,
               max_steps: int | None = None, class_weight: str | None = None,
               select_on_dev: bool | None = None, init_text: str | None = None,
               group_by_length: bool | None = None) -> TrainConfig:
    """A demo preset's settings (none for a custom task), each overridden where given. kind: input, deep,
    or None for the full fine-tuning reference."""
    preset = PRESETS.get(name, {}) if name else {}
    lr = lr or (preset.get("lr", {}).get(kind) if preset else None) or (1e-2 if kind else 3e-5)
    return TrainConfig(
        task_type=task_type or preset.get("task_type", "generate"),
        labels=labels or preset.get("labels", []),
        kind=kind or "input", full_finetune=kind is None,
        num_virtual_tokens=virtual_tokens or preset.get("num_virtual_tokens", 16),
        reparam=reparam, epochs=epochs or preset.get("epochs", 1.0),
        batch_size=batch_size or preset.get("batch_size", 16), lr=lr, base_lr=lr, seed=seed,
        max_steps=max_steps, init_text=_init_text(preset, kind, reparam, init_text),
        class_weight=class_weight or preset.get("class_weight"),
        group_by_length=preset.get("group_by_length", True) if group_by_length is None else group_by_length,
        select_on_dev=preset.get("select_on_dev", False) if select_on_dev is None else select_on_dev)


def main(args) -> int:
    from app.model.source import resolve_checkpoint
    from app.settings import get_settings

    settings = get_settings()
    checkpoint, base_name = resolve_checkpoint(settings.model, settings.cache_dir)
    device = choose_device(args.device or settings.device)
    dtype = choose_dtype(args.dtype or settings.dtype, device)
    if args.demo:
        rows = demo_rows(args.demo, args.limit)
        name = args.demo
        description = PRESETS[args.demo]["description"]
    else:
        if not args.data:
            raise SystemExit("give --demo NAME or --data FILE.jsonl")
        rows = [r for path in args.data for r in read_jsonl(path, args.limit)]
        name, description = Path(args.out).stem, args.description or ""
    kind = None if args.kind == "full" else args.kind
    cfg = config_for(args.demo, kind, lr=args.lr, task_type=args.task_type,
                     labels=args.labels.split(",") if args.labels else None, virtual_tokens=args.virtual_tokens,
                     reparam=args.reparam, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                     max_steps=args.max_steps, class_weight=args.class_weight, select_on_dev=args.select_on_dev,
                     init_text=args.init_text, group_by_length=args.group_by_length)
    out = Path(args.out or DEMO_PROMPT_SETS / f"{name}.safetensors")
    result = run_training(checkpoint, name, out, kind, rows, cfg, device, dtype, base_name, description)
    print(json.dumps(result["stats"], indent=2))
    for row in result["stats"].get("dev_scores", []):
        kept = "  <- kept" if row["step"] == result["stats"]["kept_step"] else ""
        print(f"dev  epoch {row['epoch']:>5}  step {row['step']:>5}  score {row['score']:.4f}{kept}")
    return 0
