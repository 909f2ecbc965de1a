"""Isolation soak: streaming clients and racing admin operations against two server processes on one store.

    python -m benchmarks.isolation_soak [--clients 64] [--admin-ops 1000] [--model tiny|embedded]

Two `promptserve serve` processes share one store directory (fp32, so a request's output does not depend
on its batch). 64 clients stream greedy generations from random tasks through random servers while 4
threads make random admin operations (upload, activate, delete a version, delete a task) on the same
tasks through random servers. Checked for every request:
  - its answer names a prompt-set version that was active at some moment of the request (from the admin
    operations' own start and end times: a version counts as possibly active from the start of an
    operation that made it active until the end of the first operation on the task that began after it),
  - its text equals that version's solo output (the same bytes under a reference name, alone, before the
    load started),
  - it did not fail: no 5xx and no error event; 404 (task deleted at that moment) is counted, not failed.
Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.server_process import free_port, spawn, stop, wait_ready

ADMIN = {"Authorization": "Bearer soak-admin"}
TASKS = ["t0", "t1", "t2", "t3"]
PROMPTS = ["Hello", "The weather today", "Once upon a time", "1 2 3", "Dear team,", "Why is the sky"]


@dataclass
class AdminEvent:
    task: str
    op: str
    start: float
    end: float
    status: int
    version: int | None = None  # the version it made active (upload, activate)
    sha256: str | None = None


@dataclass
class RequestRecord:
    task: str
    prompt: str
    start: float
    end: float
    status: int
    version: int | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Soak:
    servers: list[str]
    datas: list[bytes]
    solo: dict[tuple[str, str], str]  # (sha256, prompt) -> text
    max_tokens: int
    events: list[AdminEvent] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def prompt_sets(spec, n: int, seed: int = 0) -> list[bytes]:
    """Alternating input and deep sets of different lengths, large enough to steer the output."""
    from prompt_store.format import PromptSet, PromptSetMeta

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = 2 + i % 5
        if i % 2 == 0:
            ps = PromptSet(PromptSetMeta(kind="input", num_virtual_tokens=p, base_model=spec.fingerprint),
                           {"embeddings": torch.randn(p, spec.hidden_size, generator=g)})
        else:
            shape = (spec.num_layers, spec.num_kv_heads, p, spec.head_dim)
            ps = PromptSet(PromptSetMeta(kind="deep", num_virtual_tokens=p, base_model=spec.fingerprint),
                           {"keys": torch.randn(shape, generator=g) * 2, "values": torch.randn(shape, generator=g) * 2})
        out.append(ps.to_bytes(spec))
    return out


def generate(client: httpx.Client, base: str, task: str, prompt: str, max_tokens: int) -> tuple[int, int | None, str,
                                                                                                   str | None]:
    """One streamed greedy generation: (status, prompt-set version, text, error)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with client.stream("POST", f"{base}/v1/tasks/{task}", json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, "", r.text[:300]
        text, version, error = [], None, None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
                continue
            version = event["prompt_set"]["version"]
            text.append(event["text"])
        return (500 if error else 200), version, "".join(text), error


def setup_upload(client: httpx.Client, url: str, data: bytes) -> dict:
    """An upload before the load starts; a busy server (503) is retried, anything else is fatal."""
    for _ in range(10):
        r = client.put(url, content=data, headers=ADMIN)
        if r.status_code != 503:
            break
        time.sleep(2)
    if r.status_code not in (200, 201):
        raise SystemExit(f"setup upload to {url} answered {r.status_code}: {r.text[:300]}")
    return r.json()


def client_loop(soak: Soak, seed: int, done: threading.Event) -> None:
    rng = random.Random(seed)
    with httpx.Client() as client:
        while not done.is_set():
            task, prompt, base = rng.choice(TASKS), rng.choice(PROMPTS), rng.choice(soak.servers)
            start = time.monotonic()
            try:
                status, version, text, error = generate(client, base, task, prompt, soak.max_tokens)
            except httpx.HTTPError as exc:
                status, version, text, error = 599, None, "", f"{type(exc).__name__}: {exc}"
            record = RequestRecord(task, prompt, start, time.monotonic(), status, version, text, error)
            with soak.lock:
                soak.requests.append(record)


def admin_loop(soak: Soak, seed: int, ops: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        for _ in range(ops):
            task, base = rng.choice(TASKS), rng.choice(soak.servers)
            op = rng.choices(["upload", "activate", "delete_version", "delete_task"], [5, 3, 2, 1])[0]
            start = time.monotonic()
            version = sha = None
            if op == "upload":
                r = client.put(f"{base}/admin/prompt-sets/{task}", content=rng.choice(soak.datas), headers=ADMIN)
                if r.status_code in (200, 201):
                    version, sha = r.json()["version"], r.json()["sha256"]
            else:
                listing = client.get(f"{base}/admin/prompt-sets/{task}", headers=ADMIN)
                versions = [v["version"] for v in listing.json()["versions"]] if listing.status_code == 200 else [1]
                pick = rng.choice(versions)
                if op == "activate":
                    r = client.post(f"{base}/admin/prompt-sets/{task}/versions/{pick}/activate", headers=ADMIN)
                    if r.status_code == 200:
                        version, sha = r.json()["version"], r.json()["sha256"]
                elif op == "delete_version":
                    r = client.delete(f"{base}/admin/prompt-sets/{task}/versions/{pick}", headers=ADMIN)
                else:
                    r = client.delete(f"{base}/admin/prompt-sets/{task}", headers=ADMIN)
            with soak.lock:
                soak.events.append(AdminEvent(task, op, start, time.monotonic(), r.status_code, version, sha))


def possibly_active(events: list[AdminEvent], task: str, version: int, start: float, end: float) -> bool:
    """Could (task, version) have been active at some moment of [start, end]? See the module docstring."""
    on_task = [e for e in events if e.task == task and e.status < 300]
    for e in on_task:
        if e.version != version:
            continue
        later = [o.end for o in on_task if o.start > e.end and o.op != "delete_version"]
        deactivated_by = min(later, default=float("inf"))
        if e.start <= end and deactivated_by >= start:
            return True
    return False


def check(soak: Soak) -> dict:
    shas = {(e.task, e.version): e.sha256 for e in soak.events if e.version is not None}
    statuses = Counter(r.status for r in soak.requests)
    served = [r for r in soak.requests if r.status == 200]
    not_active = [r for r in served if not possibly_active(soak.events, r.task, r.version, r.start, r.end)]
    wrong_output = [r for r in served if soak.solo.get((shas.get((r.task, r.version)), r.prompt)) != r.text]
    failed = [r for r in soak.requests if r.status >= 500]  # a 200 stream with an error event counts as 500
    admin = Counter(f"{e.op} {e.status}" for e in soak.events)
    return {"requests": len(soak.requests), "request_statuses": dict(sorted(statuses.items())),
            "served": len(served), "served_a_version_never_active_during_it": len(not_active),
            "output_differs_from_solo": len(wrong_output), "failed_5xx_or_error_event": len(failed),
            "admin_ops": len(soak.events), "admin_statuses": dict(sorted(admin.items())),
            "admin_5xx": sum(1 for e in soak.events if e.status >= 500),
            "examples": {"not_active": [r.__dict__ for r in not_active[:3]],
                         "wrong_output": [r.__dict__ for r in wrong_output[:3]],
                         "failed": [r.__dict__ for r in failed[:5]]}}


def model_dir(kind: str, work: Path) -> tuple[str, str]:
    """(PROMPTSERVE_MODEL, name) for the servers."""
    from app.model.source import resolve_checkpoint
    from app.settings import Settings
    from benchmarks.tiny_model import build_tiny_model

    embedded, name = resolve_checkpoint("", Settings().cache_dir)
    if kind == "embedded":
        return "", name
    return str(build_tiny_model(work / "tiny-llama", embedded)), "tiny-llama"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--admin-ops", type=int, default=1000, help="in all, over 4 threads")
    parser.add_argument("--model", choices=["tiny", "embedded"], default="tiny")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sets", type=int, default=8, help="distinct prompt-set files the admins upload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="demo/results/isolation_soak.json")
    args = parser.parse_args(argv)

    from app.model.loader import load_model
    from app.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model, _ = model_dir(args.model, work)
    spec = load_model(Settings(model=model, dtype="float32", device="cpu")).spec
    datas = prompt_sets(spec, args.sets, args.seed)
    env = {"PROMPTSERVE_MODEL": model, "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(work / "store"), "PROMPTSERVE_ADMIN_TOKEN": ADMIN["Authorization"][7:],
           "PROMPTSERVE_MAX_NUM_SEQS": "64"}
    ports = [free_port(), free_port()]
    procs = [spawn(env, port, stdout=subprocess.DEVNULL) for port in ports]
    servers = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for base, proc in zip(servers, procs):
            wait_ready(base, proc)
        solo = {}
        with httpx.Client(timeout=120) as client:
            for i, data in enumerate(datas):
                sha = setup_upload(client, f"{servers[0]}/admin/prompt-sets/ref{i}", data)["sha256"]
                for prompt in PROMPTS:
                    status, _, text, error = generate(client, servers[0], f"ref{i}", prompt, args.max_tokens)
                    assert status == 200, error
                    solo[(sha, prompt)] = text
            assert len(set(solo.values())) > len(datas), "the prompt sets must change the output"
            setup = []
            for task in TASKS:  # before the load: these are the versions the first requests may be served
                start = time.monotonic()
                body = setup_upload(client, f"{servers[0]}/admin/prompt-sets/{task}", datas[0])
                setup.append(AdminEvent(task, "upload", start, time.monotonic(), 201, body["version"], body["sha256"]))
        soak = Soak(servers, datas, solo, args.max_tokens, events=setup)
        started = time.monotonic()
        admins = [threading.Thread(target=admin_loop, args=(soak, args.seed * 100 + k, args.admin_ops // 4))
                  for k in range(4)]
        [t.start() for t in admins]
        # the clients run until the admin operations are done (and at least 10 s)
        done = threading.Event()
        clients = [threading.Thread(target=client_loop, args=(soak, args.seed * 1000 + k, done))
                   for k in range(args.clients)]
        [t.start() for t in clients]
        [t.join() for t in admins]
        time.sleep(max(0.0, started + 10 - time.monotonic()))
        done.set()
        [t.join() for t in clients]
        wall = time.monotonic() - started
    finally:
        for proc in procs:
            stop(proc)
    result = {"model": args.model, "clients": args.clients, "servers": 2, "wall_s": round(wall, 1), **check(soak)}
    result["admin_ops"] -= len(TASKS)  # the setup uploads are in the events, not in the count asked for
    for key, value in result.items():
        if key != "examples":
            print(f"{key:45s} {value}")
    failed = [k for k in ("served_a_version_never_active_during_it", "output_differs_from_solo",
                          "failed_5xx_or_error_event", "admin_5xx") if result[k]]
    if failed:
        print(json.dumps(result["examples"], indent=1)[:4000])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
