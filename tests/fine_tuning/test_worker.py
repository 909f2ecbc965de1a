"""`promptserve worker` processes on a shared store: a worker killed mid-job leaves the job to another,
which resumes it from the last checkpoint; two workers never take the same job; SIGTERM requeues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from app.services.fine_tuning import FineTuningService, JobRequest, PromptSetOptions
from fine_tuning.files import FileBook
from fine_tuning.jobs import JobBook
from prompt_store import PromptStore
from prompt_store.records import FileRecordStore


def rows(n: int) -> bytes:
    return "\n".join(json.dumps({"text": f"win cash prize {i}" if i % 3 == 0 else f"lunch at noon {i}",
                                 "label": "spam" if i % 3 == 0 else "ham"}) for i in range(n)).encode()


@pytest.fixture
def shop(tmp_path, tiny):
    records = FileRecordStore(tmp_path / "store")
    service = FineTuningService(FileBook(records), JobBook(records), PromptStore(tmp_path / "store"), tiny.spec.name)
    return service


def start_job(service: FineTuningService, model: str, epochs: int, n: int = 24) -> str:
    file_id = service.upload_file("train.jsonl", "fine-tune", rows(n))["id"]
    job = service.create_job(JobRequest(model=model, training_file=file_id, seed=1,
                                        hyperparameters={"n_epochs": epochs, "batch_size": 2,
                                                         "learning_rate_multiplier": 1.0},
                                        prompt_set=PromptSetOptions(virtual_tokens=2)))
    assert job["status"] == "queued", job
    return job["id"]


def worker(tmp_path, tiny_model_dir, **env) -> subprocess.Popen:
    env = {**os.environ, "PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_DTYPE": "float32",
           "PROMPTSERVE_STORE_DIR": str(tmp_path / "store"), "PROMPTSERVE_TRAINING_LEASE_SECONDS": "1",
           "PROMPTSERVE_TRAINING_POLL_SECONDS": "0.1", "PROMPTSERVE_TRAINING_CHECKPOINT_SECONDS": "0.2",
           "PROMPTSERVE_TRAINING_NICE": "0", **env}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for(predicate, timeout: float = 120, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_a_killed_workers_job_resumes_from_its_checkpoint(shop, tmp_path, tiny, tiny_model_dir):
    job = start_job(shop, tiny.spec.name, epochs=50)
    first = worker(tmp_path, tiny_model_dir)
    try:
        def checkpointed():
            doc = shop.jobs.get(job)
            return doc["status"] == "running" and doc["_checkpoints"] and doc["_checkpoints"][-1]["step_number"] >= 3
        wait_for(checkpointed, what="a checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = shop.jobs.get(job)["_checkpoints"][-1]["step_number"]
        assert shop.jobs.get(job)["status"] == "running"  # nobody told the record: the lease runs out
        second = worker(tmp_path, tiny_model_dir)
        try:
            wait_for(lambda: shop.jobs.get(job)["status"] in ("succeeded", "failed"), what="the job's end")
        finally:
            stop(second)
    finally:
        stop(first)
    doc = shop.jobs.get(job)
    assert doc["status"] == "succeeded", doc["error"]
    assert doc["_attempts"] == 2 and len(set(doc["_taken_by"])) == 2
    messages = [e["message"] for e in doc["_events"]]
    resumed = [m for m in messages if m.startswith("Resumed from the checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].split("step ")[1].split()[0]) >= killed_at
    after = messages.index(resumed[0])
    steps_after = [e["data"]["step"] for e in doc["_events"][after:] if e["type"] == "metrics" and "train_loss" in
                   e["data"]]
    assert steps_after and min(steps_after) > killed_at - 1  # went on from there, did not start again
    assert shop.store.resolve(doc["fine_tuned_model"]).version == 1


def test_two_workers_never_take_the_same_job(shop, tmp_path, tiny, tiny_model_dir):
    jobs = [start_job(shop, tiny.spec.name, epochs=3, n=12) for _ in range(4)]
    procs = [worker(tmp_path, tiny_model_dir, PROMPTSERVE_TRAINING_LEASE_SECONDS="30") for _ in range(2)]
    try:
        wait_for(lambda: all(shop.jobs.get(j)["status"] == "succeeded" for j in jobs), what="every job")
    finally:
        stop(*procs)
    takers = set()
    for j in jobs:
        doc = shop.jobs.get(j)
        assert doc["_attempts"] == 1 and len(doc["_taken_by"]) == 1
        assert [e["message"] for e in doc["_events"]].count("Fine-tuning job started") == 1
        takers.update(doc["_taken_by"])
    assert len(shop.store.tasks()) == 4


def test_sigterm_puts_the_job_back_at_once(shop, tmp_path, tiny, tiny_model_dir):
    job = start_job(shop, tiny.spec.name, epochs=50)
    proc = worker(tmp_path, tiny_model_dir, PROMPTSERVE_TRAINING_LEASE_SECONDS="600")
    try:
        wait_for(lambda: shop.jobs.get(job)["_checkpoints"], what="a checkpoint")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)
    doc = shop.jobs.get(job)
    assert doc["status"] == "queued" and doc["_attempts"] == 0  # not waiting out a 600 s lease
    assert "shutting down" in doc["_events"][-1]["message"]


def test_a_worker_on_the_object_store(seaweed, tmp_path, tiny, tiny_model_dir):
    """Files, jobs, checkpoints and the result in an S3 bucket: a worker on another 'host' (its own cache
    directory) trains the job the API recorded, and the task is in the bucket's prompt-set store."""
    from prompt_store.object_store import ObjectPromptStore
    from prompt_store.records import ObjectRecordStore

    url = "s3://promptsets/fine-tuning-worker"
    records = ObjectRecordStore(seaweed.client(), "promptsets", "fine-tuning-worker/")
    store = ObjectPromptStore(url, tmp_path / "api-cache", 0.2, client=seaweed.client())
    service = FineTuningService(FileBook(records), JobBook(records), store, tiny.spec.name)
    job = start_job(service, tiny.spec.name, epochs=2)
    proc = worker(tmp_path, tiny_model_dir, PROMPTSERVE_STORE_URL=url,
                  PROMPTSERVE_STORE_DIR=str(tmp_path / "worker-cache"), **seaweed.env)
    try:
        wait_for(lambda: service.jobs.get(job)["status"] in ("succeeded", "failed"), what="the job's end")
    finally:
        stop(proc)
    doc = service.jobs.get(job)
    assert doc["status"] == "succeeded", doc["error"]
    assert store.resolve(doc["fine_tuned_model"]).meta.task_type == "classify"
    assert records.blobs(f"jobs/{job}/checkpoints")  # its checkpoints are in the bucket too


def test_a_base_that_does_not_fit_fails_the_job_saying_why(shop, tmp_path, tiny, tiny_model_dir, monkeypatch):
    """The worker `serve` starts shares the machine with the server: an 8B base loaded a second time on 24 GB
    would bring the OOM killer. It checks first, and the job fails with the reason, the worker goes on."""
    import torch

    import app.model.memory
    from app.settings import Settings
    from fine_tuning.runner import check_memory
    from fine_tuning.worker import Worker

    weights = app.model.memory.checkpoint_weight_bytes(tiny_model_dir, torch.float32)
    assert weights > 0
    check_memory(tiny_model_dir, torch.device("cpu"), torch.float32, available=weights + (2 << 30))  # fits
    monkeypatch.setattr(app.model.memory, "available_bytes", lambda device: weights // 2)
    job_id = start_job(shop, tiny.spec.name, epochs=1)
    worker = Worker(Settings(model=str(tiny_model_dir), dtype="float32", store_dir=tmp_path / "store"))
    assert worker.run_once()
    job = shop.get_job(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "insufficient_memory", job
    assert "GiB available" in job["error"]["message"] and "promptserve worker" in job["error"]["message"]
    assert worker.runner._base is None  # nothing loaded
    monkeypatch.undo()
    second = start_job(shop, tiny.spec.name, epochs=1)
    assert worker.run_once() and shop.get_job(second)["status"] == "succeeded"  # room again: it trains
