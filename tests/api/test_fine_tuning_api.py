"""The fine-tuning flow through the official `openai` SDK against a real `promptserve serve` process (its own
training worker beside it): upload, a bad file refused by line, create, events, checkpoints, success, the new
task served, cancel, promotion both ways, auth, fields OpenAI has that we refuse by name, and no training
row in the server's logs."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from benchmarks import server_process
from prompt_store.format import PromptSet, PromptSetMeta
from tests.helpers import random_deep_prompt_set
from tests.servers import free_port, stop, wait_ready

TOKEN = "ft-admin"
SECRET = "zebra-okapi-7731"  # in every training row: must never reach a log line


def rows(n: int, offset: int = 0) -> bytes:
    # the class shows in the last words: a classify head reads the last token's state, and the tiny random
    # model's state there mostly reflects that token
    return "\n".join(json.dumps(
        {"text": f"{SECRET} {i}: claim your WIN CASH PRIZE" if i % 3 == 0 else f"{SECRET} {i}: see you at lunch",
         "label": "spam" if i % 3 == 0 else "ham"}) for i in range(offset, offset + n)).encode()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny, tmp_path_factory):
    port = free_port()
    root = tmp_path_factory.mktemp("fine-tuning")
    env = {"PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(root / "store"), "PROMPTSERVE_ADMIN_TOKEN": TOKEN,
           "PROMPTSERVE_API_KEYS": "client-key", "PROMPTSERVE_MAX_MODEL_LEN": "512", "PROMPTSERVE_WARMUP": "0",
           "PROMPTSERVE_TRAINING_POLL_SECONDS": "0.2", "PROMPTSERVE_TRAINING_CHECKPOINT_SECONDS": "0.5",
           "PROMPTSERVE_TRAINING_NICE": "0"}
    log = open(root / "server.log", "w")
    proc = server_process.spawn(env, port, stdout=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield {"base": base, "model": tiny.spec.name, "spec": tiny.spec, "log": root / "server.log"}
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=TOKEN, max_retries=0)


def wait_job(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status}")


def upload(client, data: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, data), purpose="fine-tune").id


def test_files(client):
    f = client.files.create(file=("train.jsonl", rows(12)), purpose="fine-tune")
    assert (f.object, f.purpose, f.bytes, f.filename, f.status) == ("file", "fine-tune", len(rows(12)),
                                                                    "train.jsonl", "processed")
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune")]
    assert client.files.content(f.id).content == rows(12)
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


@pytest.mark.parametrize("data, where", [
    (rows(2) + b'\n{"text": "c"}\n', "line 3"),
    (rows(2) + b'\n{"text": "c", "label": "ham", "weight": 1}\n', "line 3, field 'weight'"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1, field 'messages'"),
    (b"not json\n", "line 1"),
])
def test_a_bad_file_is_refused_naming_its_line(client, data, where):
    with pytest.raises(openai.BadRequestError) as err:
        upload(client, data, "bad.jsonl")
    assert where in err.value.message and err.value.code == "invalid_file"
    assert err.value.body["param"] == "file"


def test_purpose_and_form_are_checked(client, server):
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        client.files.create(file=("x.jsonl", rows(2)), purpose="batch")
    r = httpx.post(f"{server['base']}/v1/files", headers={"Authorization": f"Bearer {TOKEN}"},
                   files={"file": ("x.jsonl", rows(2))}, data={"purpose": "fine-tune", "extra": "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    r = httpx.post(f"{server['base']}/v1/files", headers={"Authorization": f"Bearer {TOKEN}"}, json={})
    assert r.status_code == 415


def test_a_job_trains_and_its_task_is_served(client, server):
    train, valid = upload(client, rows(24)), upload(client, rows(12, offset=100), "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model=server["model"], training_file=train, validation_file=valid, suffix="sms", seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}}},
        extra_body={"prompt_set": {"kind": "deep", "virtual_tokens": 4}})
    assert job.status == "queued" and job.object == "fine_tuning.job" and job.model == server["model"]
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-sms-") and done.trained_tokens > 0
    assert (done.hyperparameters.n_epochs, done.hyperparameters.batch_size) == (2, 4)
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert events[0].created_at >= events[-1].created_at  # newest first
    metrics = [e.data for e in events if e.type == "metrics"]
    assert any("train_loss" in m for m in metrics) and sum("valid_f1" in m for m in metrics) == 2
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    older = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id).data
    assert older[0].id == events[3].id
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number == 12 and checkpoints[0].fine_tuning_job_id == job.id
    assert done.fine_tuned_model in [m.id for m in openai.OpenAI(
        base_url=server["base"] + "/v1", api_key="client-key").models.list().data]
    r = httpx.post(f"{server['base']}/v1/tasks/{done.fine_tuned_model}", json={"text": "WIN CASH now"},
                   headers={"Authorization": "Bearer client-key"})
    assert r.status_code == 200 and r.json()["label"] in ("ham", "spam")
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    # the results file: the step metrics as CSV, a job's output and never its input
    (results,) = done.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    lines = client.files.content(results).text.splitlines()
    assert lines[0] == "trial,step,train_loss,valid_loss,valid_f1"
    cells = [line.split(",") for line in lines[1:]]
    assert sum(bool(c[4]) for c in cells) == 2 and sum(bool(c[2]) for c in cells) >= 2  # 2 epochs, losses
    with pytest.raises(openai.BadRequestError, match="fine-tune-results"):
        client.fine_tuning.jobs.create(model=server["model"], training_file=results)


def test_cancel_stops_a_running_job_within_seconds(client, server):
    train = upload(client, rows(48))
    job = client.fine_tuning.jobs.create(model=server["model"], training_file=train,
                                         hyperparameters={"n_epochs": 50, "batch_size": 2},
                                         extra_body={"prompt_set": {"virtual_tokens": 2}})
    wait_job(client, job.id, ("running",))
    time.sleep(1)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    time.sleep(3)  # the worker sees it at its next report (every second at most)
    count = len(client.fine_tuning.jobs.list_events(job.id, limit=1000).data)
    time.sleep(2)
    after = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert len(after) == count and after[0].message == "Job cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    # the worker is free again: a small job after it runs
    quick = client.fine_tuning.jobs.create(model=server["model"], training_file=upload(client, rows(6)),
                                           hyperparameters={"n_epochs": 1},
                                           extra_body={"prompt_set": {"virtual_tokens": 2}})
    assert wait_job(client, quick.id).status == "succeeded"


def _upload_task(server, name: str, ps: PromptSet) -> None:
    r = httpx.put(f"{server['base']}/admin/prompt-sets/{name}", content=ps.to_bytes(server["spec"]),
                  headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text


def test_promotion_only_when_better(client, server):
    spec = server["spec"]
    base = random_deep_prompt_set(spec, 4, seed=5)
    # the active version says "ham" to everything: spam F1 0 on the validation file
    always_ham = PromptSet(PromptSetMeta(kind="deep", num_virtual_tokens=4, task_type="classify",
                                         labels=("ham", "spam"), base_model=spec.fingerprint),
                           {**base.tensors, "head.weight": torch.zeros(2, spec.hidden_size),
                            "head.bias": torch.tensor([10.0, -10.0])})
    _upload_task(server, "sms-filter", always_ham)
    train, valid = upload(client, rows(24)), upload(client, rows(12, offset=100), "valid.jsonl")
    body = dict(model=server["model"], training_file=train, validation_file=valid, seed=7,
                hyperparameters={"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 20.0},
                metadata={"promote_to": "sms-filter"})
    job = wait_job(client, client.fine_tuning.jobs.create(**body).id)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    assert job.status == "succeeded" and job.fine_tuned_model == "sms-filter", messages
    assert any(m.startswith("Promoted: validation score") and "sms-filter is now v2" in m for m in messages)
    # the same job again trains the same bytes: no better than the active version (itself), not promoted
    again = wait_job(client, client.fine_tuning.jobs.create(**body).id)
    assert again.status == "succeeded" and again.fine_tuned_model.startswith("ft-")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(again.id, limit=1000).data]
    assert any(m.startswith("Not promoted") and "sms-filter is unchanged" in m for m in messages)
    versions = httpx.get(f"{server['base']}/admin/prompt-sets/sms-filter",
                         headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert versions["active_version"] == 2 and len(versions["versions"]) == 2


def test_a_generate_job_reports_validation_loss(client, server):
    chats = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"{SECRET} greet guest {i}"},
                                               {"role": "assistant", "content": f"Hello, guest {i}!"}]})
                      for i in range(8)).encode()
    job = client.fine_tuning.jobs.create(model=server["model"], training_file=upload(client, chats),
                                         validation_file=upload(client, chats, "v.jsonl"),
                                         hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 1})
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert sum("valid_loss" in e.data for e in events) == 2
    r = httpx.post(f"{server['base']}/v1/chat/completions", headers={"Authorization": "Bearer client-key"},
                   json={"model": done.fine_tuned_model, "messages": [{"role": "user", "content": "hi"}],
                         "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_a_file_that_does_not_fit_the_task_fails_the_job_naming_the_line(client, server):
    spec = server["spec"]
    base = random_deep_prompt_set(spec, 4, seed=6)
    _upload_task(server, "topics", PromptSet(
        PromptSetMeta(kind="deep", num_virtual_tokens=4, task_type="classify", labels=("ham", "news"),
                      base_model=spec.fingerprint),
        {**base.tensors, "head.weight": torch.zeros(2, spec.hidden_size), "head.bias": torch.zeros(2)}))
    job = client.fine_tuning.jobs.create(model=server["model"], training_file=upload(client, rows(6)),
                                         validation_file=upload(client, rows(3), "v.jsonl"),
                                         metadata={"promote_to": "topics"})
    assert job.status == "failed" and job.error.param == "training_file"
    assert "line 1" in job.error.message and "'spam' is not one of the task's" in job.error.message


@pytest.mark.parametrize("extra, param", [
    ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations"),
    ({"method": {"type": "dpo", "dpo": {}}}, "method.dpo"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"extra_body": {"prompt_set": {"layers": 3}}}, "prompt_set.layers"),
    ({"extra_body": {"prompt_set": {"kind": "lora"}}}, "prompt_set.kind"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"suffix": "no spaces please"}, "suffix"),
    ({"metadata": {"promote_to": "sms-filter"}}, "validation_file"),
])
def test_refused_by_name(client, server, extra, param):
    train = upload(client, rows(6))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=server["model"], training_file=train, **extra)
    assert err.value.body["param"] == param, err.value.body


def test_unknown_model_and_ids(client, server):
    train = upload(client, rows(6))
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=server["model"], training_file="file-nope")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("../../etc/passwd")


def test_admin_token_needed(server):
    for key in ("client-key", "wrong"):
        c = openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            c.files.list()
        with pytest.raises(openai.PermissionDeniedError):
            c.fine_tuning.jobs.list()
    r = httpx.get(f"{server['base']}/v1/fine_tuning/jobs")
    assert r.status_code == 401


def test_training_rows_never_reach_the_logs(client, server):
    upload(client, rows(3))
    with pytest.raises(openai.BadRequestError):
        upload(client, rows(2) + f'\n{{"text": "{SECRET}"}}'.encode(), "bad.jsonl")
    time.sleep(0.5)
    text = server["log"].read_text()
    assert "/v1/files" in text and SECRET not in text
