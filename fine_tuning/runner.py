"""One fine-tuning job, run by a worker: read its files, train the prompt set (a small search over the
learning rate when it is "auto" and a validation file is given), report events and checkpoints through the
job record, store the result as a task, and promote it when asked and better.

The frozen base is loaded once per worker, on its first job, from the settings the server uses."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fine_tuning.data_files import parse_rows
from fine_tuning.files import FileBook, FileNotFoundInStore
from fine_tuning.jobs import JobBook, JobLost, Lease, checkpoint, event
from prompt_store import format as psf
from prompt_store.format import PromptSetMeta

log = logging.getLogger("promptserve.worker")

# the base learning rate of each kind (the demo presets'); learning_rate_multiplier scales it
BASE_LR = {"deep": 1e-2, "input": 3e-2}
BASE_HEAD_LR = 2e-3  # a classify or extract head's (the trainer's default): scaled by the multiplier too
# "auto" learning rate with a validation file: these multipliers are tried, the best validation score kept
# (going on from the active version of the task a job may replace was tried as a fourth trial on the demo
# spam data: dev F1 0.968 after the threshold, below the fresh trials' 0.974; not kept)
AUTO_LR_MULTIPLIERS = (1.0, 2.0, 0.5)
REPORT_EVERY_S = 1.0  # how often the record is written while training (events, the lease, a cancel seen)
METRIC_EVENTS_PER_TRIAL = 100  # train-loss events per trial, at most (each step's loss is in the mean)


class WorkerStopping(Exception):
    """The worker is shutting down: the job goes back to the queue, to resume from its last checkpoint."""


class NotEnoughMemory(RuntimeError):
    """The worker cannot load the base model for training in the memory left to it."""


# what training needs beyond the frozen weights (activations, the prompt's optimizer state), at least
TRAINING_HEADROOM_BYTES = 1 << 30
TRAINING_HEADROOM_FRACTION = 0.25  # of the weights


def check_memory(checkpoint_dir, device: torch.device, dtype: torch.dtype, available=None) -> None:
    """Refuses to load the base where it cannot fit: the worker `serve` starts shares the machine with the
    server, which holds the model already, and an 8B model loaded twice on 24 GB would send the kernel's OOM
    killer after one of them (perhaps the server). Better the job fails, saying why."""
    from app.model.memory import available_bytes, checkpoint_weight_bytes

    weights = checkpoint_weight_bytes(checkpoint_dir, dtype)
    free = available_bytes(device) if available is None else available
    if weights is None or free is None:
        return  # nothing to go by
    need = weights + max(TRAINING_HEADROOM_BYTES, int(weights * TRAINING_HEADROOM_FRACTION))
    if need > free:
        raise NotEnoughMemory(
            f"training needs about {need / 2**30:.1f} GiB for the base model ({weights / 2**30:.1f} GiB of weights "
            f"in {str(dtype).removeprefix('torch.')}) and this worker has {free / 2**30:.1f} GiB available: run "
            "workers on their own (`promptserve worker`, deploy/k8s/components/training-worker) with more memory")


@dataclass
class Base:
    model: object
    tokenizer: object
    spec: object
    device: torch.device
    dtype: torch.dtype


def resolve_hyperparameters(hyper: dict, rows: int, has_validation: bool) -> tuple[int, int, list[float]]:
    """(epochs, batch size, learning-rate multipliers to try) from the job's values or "auto": epochs so a
    small file still sees ~4,000 examples, 3 to 10 (OpenAI's "auto" starts at 3 as well; the best epoch on
    the validation file is kept), batches of 16 (fewer rows: all of them)."""
    epochs = hyper.get("n_epochs", "auto")
    # at least 3: on the demo spam data (3,902 rows) 3 epochs served dev F1 0.981 where 2 served 0.974 (the
    # best epoch was the second of three both times, with the learning rate decaying over three)
    epochs = min(10, max(3, math.ceil(4000 / max(1, rows)))) if epochs == "auto" else int(epochs)
    batch = hyper.get("batch_size", "auto")
    batch = min(16, rows) if batch == "auto" else int(batch)
    lrm = hyper.get("learning_rate_multiplier", "auto")
    lrms = list(AUTO_LR_MULTIPLIERS if has_validation else (1.0,)) if lrm == "auto" else [float(lrm)]
    return epochs, batch, lrms


def positive_label(spec: dict, counts: dict[str, int]) -> str | None:
    """Binary classify: the rarer label of the training file is the one whose F1 scores the task (spam)."""
    labels = spec["labels"]
    if spec["task_type"] != "classify" or len(labels) != 2:
        return None
    return min(labels, key=lambda label: (counts.get(label, 0), labels.index(label)))


class Reporter:
    """Events and fields for the job record, written at most every REPORT_EVERY_S (and at once when asked):
    each write renews the lease and raises JobLost when the job was cancelled or taken over."""

    def __init__(self, book: JobBook, job_id: str, lease: Lease, stopping: Callable[[], bool]):
        self.book, self.job_id, self.lease, self.stopping = book, job_id, lease, stopping
        self.pending: list[dict] = []
        self.fields: dict = {}
        self.last = 0.0

    def add(self, message: str, level: str = "info", data: dict | None = None, type: str = "message") -> None:
        self.pending.append(event(message, level, data, type))

    def flush(self, force: bool = False) -> None:
        if self.stopping():
            raise WorkerStopping()
        if not force and time.monotonic() - self.last < REPORT_EVERY_S:
            return
        # cleared only once written: a write that fails (the store unreachable for a moment) keeps them
        self.book.report(self.job_id, self.lease, self.pending, **self.fields)
        self.pending = []
        self.last = time.monotonic()

    def take(self) -> list[dict]:
        events, self.pending = self.pending, []
        return events


class JobRunner:
    def __init__(self, book: JobBook, files: FileBook, store, settings, lease: Lease,
                 stopping: Callable[[], bool] = lambda: False):
        self.book, self.files, self.store, self.settings, self.lease = book, files, store, settings, lease
        self.stopping = stopping
        self._base: Base | None = None

    def base(self) -> Base:
        if self._base is None:
            from app.model.loader import choose_device, choose_dtype, load_checkpoint
            from app.model.source import resolve_checkpoint
            from app.model.spec import model_spec

            checkpoint_dir, name = resolve_checkpoint(self.settings.model, self.settings.cache_dir)
            device = choose_device(self.settings.device)
            dtype = choose_dtype(self.settings.dtype, device)
            check_memory(checkpoint_dir, device, dtype)
            model, tokenizer = load_checkpoint(checkpoint_dir, device, dtype)
            self._base = Base(model, tokenizer, model_spec(model, name), device, dtype)
        return self._base

    # -- one job -------------------------------------------------------------------------------------
    def run(self, job: dict) -> None:
        reporter = Reporter(self.book, job["id"], self.lease, self.stopping)
        try:
            self._run(job, reporter)
        except JobLost as exc:
            log.info("job %s: stopped (%s)", job["id"], exc)
        except WorkerStopping:
            self._requeue(job["id"], reporter)
        except NotEnoughMemory as exc:
            log.error("job %s: %s", job["id"], exc)
            self._finish(job["id"], reporter, "failed", error={"code": "insufficient_memory", "param": None,
                                                                "message": str(exc)})
        except Exception as exc:  # a failure of this job only: recorded on it, the worker goes on
            log.exception("job %s failed", job["id"])
            self._finish(job["id"], reporter, "failed", error={
                "code": "training_failed", "param": None, "message": f"{type(exc).__name__}: {exc}"})

    def _finish(self, job_id: str, reporter: Reporter, status: str, **fields) -> bool:
        """Ends the job (False: it was cancelled or taken over meanwhile, and keeps that end)."""
        events = reporter.take()
        if status == "failed":
            events.append(event(fields["error"]["message"], "error"))
        try:
            self.book.finish(job_id, self.lease, status, events, **fields)
            return True
        except JobLost:
            return False

    def _requeue(self, job_id: str, reporter: Reporter) -> None:
        """Shutting down: the job goes back to the queue at once (not after the lease), this take uncounted."""
        def change(doc):
            if doc["status"] != "running" or doc["_worker"] != self.lease.worker:
                return None
            doc["_events"] += reporter.take() + [event("The worker is shutting down: the job is queued again "
                                                       "and resumes from its last checkpoint", "warn")]
            doc.update(status="queued", _worker=None, _lease_until=0, _attempts=max(0, doc["_attempts"] - 1))
            return doc

        self.book.update(job_id, change)

    def _rows(self, file_id: str, param: str) -> tuple[list[dict], object]:
        try:
            return parse_rows(self.files.content(file_id), self.files.limits.max_lines)
        except FileNotFoundInStore:
            raise ValueError(f"{param} {file_id} was deleted before the job started") from None

    def _run(self, job: dict, reporter: Reporter) -> None:
        from training.data import build_examples
        from training.evaluate import served_binary_f1, serving_margin_noise, tune_binary_threshold, validation_figures
        from training.trainer import TrainConfig, TrainHooks, TrainState, train

        spec = job["prompt_set"]
        rows, summary = self._rows(job["training_file"], "training_file")
        val_rows = self._rows(job["validation_file"], "validation_file")[0] if job["validation_file"] else None
        epochs, batch, lrms = resolve_hyperparameters(job["hyperparameters"], len(rows), val_rows is not None)
        hyper_auto = job["hyperparameters"].get("learning_rate_multiplier", "auto") == "auto"
        base = self.base()
        positive = positive_label(spec, summary.label_counts)
        task_type, labels = spec["task_type"], spec["labels"]
        examples = build_examples(base.tokenizer, rows, task_type, labels)

        saved = self._load_checkpoint(job)
        trials: list[dict] = saved["trials"] if saved else []  # finished: {lrm, score, figures, data}
        resume = TrainState(**saved["state"]) if saved and saved.get("state") else None
        first_trial = len(trials)
        if saved:
            reporter.add(f"Resumed from the checkpoint at step {saved['state']['step'] if resume else 0} of "
                         f"trial {first_trial + 1}")
        reporter.fields = {"hyperparameters": {**job["hyperparameters"], "n_epochs": epochs, "batch_size": batch,
                                               "learning_rate_multiplier": lrms[0] if len(lrms) == 1 else "auto"}}
        rates = (f"learning rate multipliers {', '.join(map(str, lrms))} (the best on the validation file kept)"
                 if len(lrms) > 1 else f"learning rate multiplier {lrms[0]}")
        reporter.add(f"Training {spec['kind']} prompt set ({spec['virtual_tokens']} virtual tokens, {task_type}) on "
                     f"{len(rows)} rows: {epochs} epochs, batch size {batch}, {rates}")
        reporter.flush(force=True)
        steps_per_epoch = math.ceil(len(examples) / batch)
        total_steps = steps_per_epoch * epochs
        evaluate = None
        if val_rows is not None:
            def evaluate(module):
                return _plain(validation_figures(module, base.tokenizer, task_type, labels, val_rows, base.device,
                                                 positive))

        # two labels and a validation file: a trial is scored by the F1 expected once served
        served_f1 = positive is not None and val_rows is not None
        tunes_threshold = served_f1 and hyper_auto
        noise = serving_margin_noise(base.dtype)
        # a classify loss weighted against the labels' imbalance, unless the decision point is chosen on the
        # validation file afterwards (two labels, "auto"): the threshold then does the balancing, and the
        # unweighted loss ranked better (demo spam dev F1 after the threshold: 0.981 unweighted, 0.974 weighted)
        class_weight = "balanced" if task_type == "classify" and not tunes_threshold else None
        started = time.monotonic()
        done_at_start = first_trial * total_steps + (resume.step if resume else 0)
        for index in range(first_trial, len(lrms)):
            lrm = lrms[index]
            cfg = TrainConfig(task_type=task_type, labels=list(labels), kind=spec["kind"],
                              num_virtual_tokens=spec["virtual_tokens"], epochs=float(epochs), batch_size=batch,
                              lr=BASE_LR[spec["kind"]] * lrm, head_lr=BASE_HEAD_LR * lrm, seed=job["seed"],
                              init_text=spec["init_text"],
                              class_weight=class_weight)
            every = max(1, total_steps // METRIC_EVENTS_PER_TRIAL)
            trial_no = index + 1
            window: list[float] = []

            def on_step(step, total, loss, trial_no=trial_no, window=window, every=every):
                window.append(loss)
                done = (trial_no - 1) * total + step  # steps of every trial so far
                rate = (time.monotonic() - started) / max(1, done - done_at_start)
                reporter.fields.update(progress={"step": step, "total_steps": total, "trial": trial_no,
                                                 "trials": len(lrms)},
                                       estimated_finish=int(time.time() + rate * (total * len(lrms) - done)))
                if step % every == 0 or step == total:
                    reporter.add(f"Step {step}/{total}: training loss={sum(window) / len(window):.4f}",
                                 data={"step": step, "total_steps": total, "train_loss": sum(window) / len(window),
                                       "trial": trial_no}, type="metrics")
                    window.clear()
                reporter.flush()

            def on_eval(row, trial_no=trial_no):
                figures = {k: v for k, v in row.items() if k not in ("per_label", "entity_f1")}
                name = "valid_loss" if task_type == "generate" else "valid_f1"
                value = row["valid_loss"] if task_type == "generate" else row["f1"]
                reporter.add(f"Epoch {row['epoch']:g} (step {row['step']}): {name}={value:.4f}",
                             data={**figures, name: value, "trial": trial_no}, type="metrics")
                reporter.flush(force=True)

            def save(state, trial_no=trial_no):
                self._checkpoint(job, reporter, trials, state, trial_no)

            result = train(base.model, base.spec, base.tokenizer, examples, cfg, base.device, progress=False,
                           evaluate=evaluate, resume=resume if index == first_trial else None,
                           hooks=TrainHooks(on_step=on_step, on_eval=on_eval, checkpoint=save,
                                            checkpoint_every_s=self.settings.training_checkpoint_seconds))
            score = max((r["score"] for r in result.dev_scores), default=None)
            if tunes_threshold:
                # part of the search: the decision point, chosen for the F1 expected once served (the serving
                # forward's margins differ a little from these)
                choice = tune_binary_threshold(result.module, base.tokenizer, labels, val_rows, positive,
                                               base.device, noise)
                score = choice.expected_after
                if choice.shift:
                    reporter.add(f"Decision threshold moved on the validation file: {positive} margin "
                                 f"{choice.shift:+.3f}, valid_f1 {choice.exact_before:.4f} -> "
                                 f"{choice.exact_after:.4f} (expected when served, margin noise {noise:.2f}: "
                                 f"{choice.expected_before:.4f} -> {choice.expected_after:.4f})",
                                 data={"trial": trial_no, "threshold_shift": choice.shift,
                                       "valid_f1_before": choice.exact_before, "valid_f1": choice.exact_after,
                                       "expected_f1_before": choice.expected_before,
                                       "expected_f1": choice.expected_after, "margin_noise": noise})
            elif served_f1:  # the set as trained, at its own decision point
                score = served_binary_f1(result.module, base.tokenizer, labels, val_rows, positive, base.device,
                                         noise)
            meta = PromptSetMeta(kind=spec["kind"], num_virtual_tokens=spec["virtual_tokens"], task_type=task_type,
                                 labels=tuple(labels), base_model=base.spec.fingerprint,
                                 base_model_name=base.spec.name,
                                 description=f"fine-tuning job {job['id']}",
                                 extra={"fine_tuning_job": job["id"], "learning_rate_multiplier": lrm,
                                        "validation_score": score})
            ps = result.module.export(meta)
            psf.check_compatible(ps, base.spec)
            trials.append({"lrm": lrm, "score": score, "tokens": result.tokens, "data": ps.to_bytes(base.spec)})
            if len(lrms) > 1:
                what = "expected served valid_f1" if served_f1 else "best validation score"
                reporter.add(f"Trial {trial_no}/{len(lrms)} (learning rate multiplier {lrm}): {what} {score:.4f}",
                             data={"trial": trial_no, "learning_rate_multiplier": lrm, "score": score})
            resume = None
        self._publish(job, trials, reporter, task_type, labels, val_rows, positive)

    def _checkpoint(self, job: dict, reporter: Reporter, trials: list[dict], state, trial_no: int) -> None:
        """The finished trials and the current one's state. A trial's last checkpoint is at its last step, so
        a job resumed there finishes that trial at once (its best epoch restored) and starts the next."""
        data = _to_bytes({"trials": trials, "state": state.__dict__})
        metrics = {"step": state.step, "trial": trial_no, "train_loss": state.losses[-1]}
        entry = checkpoint(job, state.step, metrics,
                           f"jobs/{job['id']}/checkpoints/trial-{trial_no}-step-{state.step}")
        self.book.add_checkpoint(job["id"], self.lease, entry, data, reporter.take())

    def _publish(self, job: dict, trials: list[dict], reporter: Reporter, task_type: str, labels: list[str],
                 val_rows: list[dict] | None, positive: str | None) -> None:
        best = max(trials, key=lambda t: -math.inf if t["score"] is None else t["score"])
        spec = job["prompt_set"]
        promote_to = spec.get("promote_to")
        name = None
        if promote_to is not None:
            active = self._active_score(promote_to, task_type, labels, val_rows, positive)
            if active is None or best["score"] > active[1]:
                info = self.store.put(promote_to, best["data"])
                name = promote_to
                reporter.add(f"Promoted: validation score {best['score']:.4f} beats the active version's "
                             f"{'(none)' if active is None else f'{active[1]:.4f} (v{active[0]})'}; "
                             f"{promote_to} is now v{info.version}",
                             data={"score": best["score"], "active_score": active and active[1],
                                   "version": info.version})
            else:
                reporter.add(f"Not promoted: validation score {best['score']:.4f} does not beat the active "
                             f"version's {active[1]:.4f} (v{active[0]}) on the same file; {promote_to} is "
                             "unchanged", "warn", data={"score": best["score"], "active_score": active[1]})
        if name is None:
            suffix = job.get("user_provided_suffix")
            name = f"ft-{suffix}-{job['id'][6:14]}" if suffix else f"ft-{job['id'][6:18]}"
            self.store.put(name, best["data"])
        results = self.files.add_result("step_metrics.csv", self._step_metrics(job["id"], reporter.pending))
        reporter.add(f"The job has successfully completed: {name} is served", data={"fine_tuned_model": name})
        if not self._finish(job["id"], reporter, "succeeded", fine_tuned_model=name, result_files=[results["id"]],
                            trained_tokens=sum(t["tokens"] for t in trials)):
            self.files.delete(results["id"])  # no job shows it

    def _step_metrics(self, job_id: str, pending: list[dict]) -> bytes:
        """The job's metrics events as CSV, a row each (OpenAI's results file): the training loss every few
        steps, the validation figure after each epoch, by trial."""
        columns = ("trial", "step", "train_loss", "valid_loss", "valid_f1")
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for e in self.book.get(job_id)["_events"] + pending:
            if e["type"] == "metrics":
                writer.writerow(["" if e["data"].get(c) is None else e["data"][c] for c in columns])
        return out.getvalue().encode()

    def _active_score(self, task: str, task_type: str, labels: list[str], val_rows: list[dict],
                      positive: str | None) -> tuple[int, float] | None:
        """(version, validation score) of the task's active version, on the job's validation rows, scored as
        the job's trials are (two labels: the F1 expected once served, at the version's own decision point)."""
        from app.model.forward import DecoderForward
        from training.evaluate import served_binary_f1, serving_margin_noise, validation_figures
        from training.prompt_module import PromptModule

        try:
            info = self.store.resolve(task)
        except Exception:
            return None  # deleted meanwhile: the result becomes its first version
        base = self.base()
        module = PromptModule.from_prompt_set(DecoderForward(base.model), base.spec, psf.load(info.path))
        module.eval()
        if positive is not None:
            return info.version, served_binary_f1(module, base.tokenizer, labels, val_rows, positive, base.device,
                                                  serving_margin_noise(base.dtype))
        return info.version, validation_figures(module, base.tokenizer, task_type, labels, val_rows, base.device,
                                                positive)["score"]

    def _load_checkpoint(self, job: dict) -> dict | None:
        current = self.book.get(job["id"])["_checkpoints"]
        for entry in reversed(current):
            try:
                return torch.load(io.BytesIO(self.files.records.get_blob(entry["_blob"])), weights_only=False)
            except Exception:  # a checkpoint whose bytes are gone: an older one, else the start
                continue
        return None


def _plain(figures: dict) -> dict:
    """Validation figures with only JSON numbers (the record is JSON)."""
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in figures.items()}


def _to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
