"""The training loop: frozen base, prompt parameters (and a head) get gradients; loss on answers only."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.model.forward import DecoderForward
from training.data import Example
from training.prompt_module import PromptModule


@dataclass
class TrainConfig:
    task_type: str = "generate"
    labels: list[str] = field(default_factory=list)
    kind: str | None = "deep"  # input | deep | None (no prompt: full fine-tuning)
    num_virtual_tokens: int = 16
    reparam: bool = False
    full_finetune: bool = False
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-2
    head_lr: float = 2e-3
    base_lr: float = 3e-5  # full fine-tuning only
    weight_decay: float = 0.0
    warmup: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0
    max_steps: int | None = None
    # initialise the prompt from this text: input, its token embeddings; deep, the keys and values the
    # frozen model computes for it (Li & Liang's real-activation init), so either starts out as the text
    # written before the request and training moves on from there
    init_text: str = ""
    # batches of examples of similar length (shuffled batch order): the demo sets waste 44-63% of a
    # randomly drawn batch on padding
    group_by_length: bool = True
    # demo tasks: evaluate on dev after each epoch and keep the best epoch's parameters
    select_on_dev: bool = False
    # classify: "balanced" weights each label's loss by the inverse of its frequency in the training data
    # (spam is 13% of the SMS messages); None: every example counts the same
    class_weight: str | None = None


@dataclass
class TrainState:
    """Where a run is after `step` steps: what a checkpoint saves and a resumed run starts from (the batch
    order is replayed from the seed, so a resumed run sees the batches the first one would have)."""
    step: int
    params: list[torch.Tensor]
    optimizer: dict
    scheduler: dict
    losses: list[float]
    tokens: int
    dev_scores: list[dict]
    best: tuple | None  # (score, step, the parameters then)


@dataclass
class TrainHooks:
    """Calls out of the loop (a fine-tuning job's events, checkpoints and cancel). A hook that raises ends
    the run with that exception."""
    on_step: Callable[[int, int, float], None] | None = None  # (step, total steps, loss)
    on_eval: Callable[[dict], None] | None = None  # a dev row after an epoch: {"epoch", "step", "score", ...}
    checkpoint: Callable[[TrainState], None] | None = None  # at each epoch's end, and every checkpoint_every_s
    checkpoint_every_s: float = 60.0


@dataclass
class TrainResult:
    module: PromptModule
    losses: list[float]
    seconds: float
    tokens: int
    trainable_params: int
    # with a dev evaluation: its score after each epoch ({"epoch", "step", "score"}), and the step whose
    # parameters the module holds (the best score's)
    dev_scores: list[dict] = field(default_factory=list)
    kept_step: int | None = None


# examples sorted by length within a window of this many batches: batches of similar lengths, still drawn
# from a shuffled order (the megabatch scheme of transformers' group_by_length)
_GROUP_WINDOW = 50


def _batches(examples: list[Example], batch_size: int, rng: random.Random, group_by_length: bool = False):
    order = list(range(len(examples)))
    rng.shuffle(order)
    if not group_by_length:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        window = batch_size * _GROUP_WINDOW
        batches = []
        for i in range(0, len(order), window):
            chunk = sorted(order[i:i + window], key=lambda j: len(examples[j].ids), reverse=True)
            batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
    for batch in batches:
        yield [examples[j] for j in batch]


def _collate(batch: list[Example], pad_id: int, device):
    t = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, e in enumerate(batch):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        rows += [b] * len(e.positions)
        cols += e.positions
        targets += e.targets
    return (ids.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device),
            torch.tensor(targets, device=device))


def loss_on(module: PromptModule, batch: list[Example], pad_id: int, device,
            class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    ids, rows, cols, targets = _collate(batch, pad_id, device)
    h = module.hidden(ids)[rows, cols]
    if module.head is not None:
        logits = module.head(h.float())
    else:
        logits = module.f.logits(h)
    return F.cross_entropy(logits, targets, weight=class_weights), int(ids.numel())


def balanced_class_weights(examples: list[Example], num_labels: int) -> torch.Tensor:
    """n / (k * count of each label) over the examples' targets (sklearn's "balanced")."""
    counts = torch.zeros(num_labels)
    for e in examples:
        for t in e.targets:
            counts[t] += 1
    return counts.sum() / (num_labels * counts.clamp(min=1))


def head_rows_for(task_type: str, labels: list[str]) -> int | None:
    if task_type == "classify":
        return len(labels)
    if task_type == "extract":
        return 1 + 2 * len(labels)
    return None


def build_module(model, spec, tokenizer, cfg: TrainConfig) -> PromptModule:
    init_ids = tokenizer.encode(cfg.init_text, add_special_tokens=False) if cfg.init_text else None
    module = PromptModule(DecoderForward(model), spec, None if cfg.full_finetune else cfg.kind,
                          cfg.num_virtual_tokens, head_rows_for(cfg.task_type, cfg.labels), cfg.reparam,
                          init_ids=init_ids)
    model.requires_grad_(cfg.full_finetune)
    return module


def train(model, spec, tokenizer, examples: list[Example], cfg: TrainConfig, device,
          progress: bool = True, autocast_dtype: torch.dtype | None = None,
          evaluate: Callable[[PromptModule], float | dict] | None = None, hooks: TrainHooks | None = None,
          resume: TrainState | None = None) -> TrainResult:
    """evaluate: a dev score (higher is better; or a dict of figures with the score under "score") run after
    each epoch; the module ends with the parameters of the best epoch (early stopping on dev, without
    stopping: every epoch runs). resume: a checkpoint's state to go on from."""
    hooks = hooks or TrainHooks()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    # The base model is not a submodule of PromptModule (DecoderForward only references its layers), so this
    # moves the prompt parameters and head alone; the base model is already on its device.
    module = build_module(model, spec, tokenizer, cfg).to(device)
    groups = []
    prompt_params = [p for n, p in module.named_parameters(recurse=False)] + \
        (list(module.mlp.parameters()) if cfg.reparam and module.kind == "deep" else [])
    if prompt_params:
        groups.append({"params": prompt_params, "lr": cfg.lr})
    if module.head is not None:
        groups.append({"params": list(module.head.parameters()), "lr": cfg.head_lr})
    if cfg.full_finetune:
        groups.append({"params": list(model.parameters()), "lr": cfg.base_lr})
    params = [p for g in groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    warm = max(1, int(total * cfg.warmup))
    # linear warm-up, then linear decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    pad_id = tokenizer.eos_token_id
    class_weights = None
    if cfg.class_weight == "balanced" and cfg.task_type == "classify":
        class_weights = balanced_class_weights(examples, len(cfg.labels)).to(device)
    elif cfg.class_weight is not None:
        raise ValueError(f"class_weight {cfg.class_weight!r}: only 'balanced', for classify tasks")
    losses, tokens, step = [], 0, 0
    dev_scores, best = [], None  # best: (score, step, a copy of the trainable parameters)
    if resume is not None:
        with torch.no_grad():
            for p, saved in zip(params, resume.params):
                p.copy_(saved)
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.scheduler)
        losses, tokens, step = list(resume.losses), resume.tokens, resume.step
        dev_scores, best = list(resume.dev_scores), resume.best
    start = last_checkpoint = time.monotonic()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"train {cfg.task_type}/{cfg.kind or 'full'}")
    module.train()
    drawn = 0  # batches drawn so far: a resumed run draws (and skips) the ones its first run trained on
    while step < total:
        for batch in _batches(examples, cfg.batch_size, rng, cfg.group_by_length):
            if step >= total:
                break
            drawn += 1
            if drawn <= step:
                continue
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, n = loss_on(module, batch, pad_id, device, class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tokens += n
            losses.append(float(loss.detach()))
            elapsed = time.monotonic() - start
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update(1)
            if hooks.on_step is not None:
                hooks.on_step(step, total, losses[-1])
            epoch_end = step % steps_per_epoch == 0 or step == total
            if evaluate is not None and epoch_end:
                row = {"epoch": round(step / steps_per_epoch, 2), "step": step, **_dev_score(module, evaluate)}
                dev_scores.append(row)
                score = row["score"]
                if progress:
                    bar.write(f"dev after step {step} (epoch {row['epoch']}): {score:.4f}")
                if best is None or score > best[0]:
                    best = (score, step, [p.detach().clone() for p in params])
                if hooks.on_eval is not None:
                    hooks.on_eval(row)
            if hooks.checkpoint is not None and (
                    epoch_end or time.monotonic() - last_checkpoint >= hooks.checkpoint_every_s):
                hooks.checkpoint(TrainState(step, [p.detach().clone() for p in params], opt.state_dict(),
                                            sched.state_dict(), list(losses), tokens, list(dev_scores), best))
                last_checkpoint = time.monotonic()
    bar.close()
    seconds = time.monotonic() - start
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[2]):
                p.copy_(kept)
    module.eval()
    model.requires_grad_(False)
    return TrainResult(module, losses, seconds, tokens, trainable, dev_scores, best[1] if best else None)


def _dev_score(module: PromptModule, evaluate: Callable[[PromptModule], float | dict]) -> dict:
    module.eval()
    try:
        with torch.no_grad():
            result = evaluate(module)
            return dict(result) if isinstance(result, dict) else {"score": float(result)}
    finally:
        module.train()
