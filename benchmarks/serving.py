"""`promptserve bench`: a serving benchmark against plain-transformers baselines, in one run.

Phases against a live server (started here unless --url is given), all with a fixed output length
(ignore_eos) and streamed responses so time-to-first-token is measured:
  sweep      closed loop of N clients for each concurrency, tasks mixed in the chosen proportions
  single     the top concurrency with every request on one task
  many       1,000 registered prompt sets, each request picking one at random
  upload     a new version uploaded under load: time until it is served, and failed requests
Baselines, in-process after the server has stopped (same dtype, same prompts and lengths):
  HF generate on the bare model with batch = top concurrency, and with batch 1; per-request generate
  with the prompt set prepended through inputs_embeds (what a P-Tuning tutorial would have you write).
Prints a table with ratios, writes JSON, draws a PNG of throughput and latency against concurrency.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from training.data import read_jsonl
from training.presets import DATASETS, ROOT

ADMIN_TOKEN = "bench-admin"


@dataclass
class Job:
    task: str
    messages: list[dict]


def load_prompts(n: int, seed: int = 0) -> dict[str, list[list[dict]]]:
    """Real prompts per demo task: chat instructions, tweets to tag, SMS messages to judge."""
    rng = random.Random(seed)
    chat = [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")}]
            for r in read_jsonl(DATASETS / "chat/dev.jsonl")]
    ner = [[{"role": "user", "content": "List the named entities: " + " ".join(r["tokens"])}]
           for r in read_jsonl(DATASETS / "wnut16/dev.jsonl")]
    spam = [[{"role": "user", "content": "Is this message spam? " + r["text"]}]
            for r in read_jsonl(DATASETS / "sms_spam/dev.jsonl")]
    return {k: [rng.choice(v) for _ in range(n)] for k, v in {"chat": chat, "ner": ner, "spam": spam}.items()}


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    out = {"requests": len(records), "failed": len(records) - len(ok), "wall_s": wall,
           "output_tok_s": tokens / wall, "req_s": len(ok) / wall}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}"] = percentile(xs, p)
    out["decode_tok_s_per_request"] = 1 / statistics.median(tpot) if tpot else float("nan")
    return out


async def one_request(client: httpx.AsyncClient, job: Job, output_len: int) -> dict:
    start = time.perf_counter()
    first, tokens, version = None, 0, None
    body = {"messages": job.messages, "max_tokens": output_len, "ignore_eos": True, "stream": True,
            "temperature": 0}
    try:
        async with client.stream("POST", f"/v1/tasks/{job.task}", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "status": event["error"]["status"], "tokens": 0}
                if first is None:
                    first = time.perf_counter() - start
                version = event["prompt_set"]["version"]
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"ok": False, "status": repr(exc), "tokens": 0}
    return {"ok": tokens == output_len, "ttft": first, "e2e": time.perf_counter() - start, "tokens": tokens,
            "version": version}


async def closed_loop(url: str, jobs: list[Job], concurrency: int, output_len: int) -> dict:
    queue = list(jobs)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                records.append(await one_request(client, queue.pop(), output_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(records, wall)


async def poisson(url: str, jobs: list[Job], rate: float, output_len: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        start = time.perf_counter()
        tasks = []
        for job in jobs:
            tasks.append(asyncio.create_task(one_request(client, job, output_len)))
            await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return summarize(list(records), wall)


def mixed_jobs(prompts, tasks: dict[str, str], mix: dict[str, float], n: int, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    names = list(mix)
    weights = [mix[k] for k in names]
    picks = rng.choices(names, weights, k=n)
    return [Job(tasks[k], prompts[k][i]) for i, k in enumerate(picks)]


# -- prompt sets for the benchmark --------------------------------------------------------------
def bench_prompt_sets(spec_fingerprint: str) -> dict[str, bytes]:
    """Generate-type prompt sets built from the shipped demo sets, so that the benchmark mixes kinds
    (chat: input; ner and spam: deep) without changing what the demo tasks are."""
    from prompt_store import format as psf

    out = {}
    for name in ("chat", "ner", "spam"):
        ps = psf.load(ROOT / "demo/prompt_sets" / f"{name}.safetensors")
        tensors = {k: v for k, v in ps.tensors.items() if not k.startswith("head.")}
        meta = psf.PromptSetMeta(kind=ps.kind, num_virtual_tokens=ps.meta.num_virtual_tokens, task_type="generate",
                                 base_model=spec_fingerprint, description=f"benchmark copy of {name}")
        out[f"bench-{name}"] = psf.PromptSet(meta, tensors).to_bytes()
    return out


def many_prompt_sets(base: bytes, n: int, seed: int = 0):
    from prompt_store import format as psf

    ps = psf.parse(base)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        tensors = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in ps.tensors.items()}
        yield f"many-{i:04d}", psf.PromptSet(ps.meta, tensors).to_bytes()


async def upload(client: httpx.AsyncClient, name: str, data: bytes) -> dict:
    r = await client.put(f"/admin/prompt-sets/{name}", content=data,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    r.raise_for_status()
    return r.json()


async def upload_under_load(url: str, jobs: list[Job], concurrency: int, output_len: int, data: bytes) -> dict:
    """Upload a new version of bench-chat while the server is busy; measure how soon it is served."""
    load = asyncio.create_task(closed_loop(url, jobs, concurrency, output_len))
    await asyncio.sleep(3)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        info = await upload(client, "bench-chat", data)
        answered = time.perf_counter()
        r = await client.post("/v1/tasks/bench-chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 1})
        served = time.perf_counter() - answered
        version_served = r.json()["prompt_set"]["version"]
    stats = await load
    return {"new_version": info["version"], "version_served": version_served, "served_within_s": served,
            "failed_requests": stats["failed"], "load": stats}


# -- baselines ----------------------------------------------------------------------------------
def _encode(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@torch.inference_mode()
def hf_batched(model, tokenizer, prompts: list[list[dict]], output_len: int, batch: int) -> dict:
    tokenizer.padding_side = "left"
    ids = [_encode(tokenizer, m) for m in prompts]
    total, start = 0, time.perf_counter()
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        x = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = model.generate(x, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                             do_sample=False)
        total += (out.shape[1] - width) * len(chunk)
    wall = time.perf_counter() - start
    return {"output_tok_s": total / wall, "wall_s": wall, "requests": len(ids), "batch": batch}


@torch.inference_mode()
def hf_inputs_embeds_per_request(model, tokenizer, embeddings: torch.Tensor, prompts, output_len: int) -> dict:
    total, start = 0, time.perf_counter()
    for m in prompts:
        ids = torch.tensor([_encode(tokenizer, m)])
        tok = model.get_input_embeddings()(ids)
        x = torch.cat([embeddings.to(tok.dtype).unsqueeze(0), tok], 1)
        out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                             max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
        total += out.shape[1]
    wall = time.perf_counter() - start
    return {"output_tok_s": total / wall, "wall_s": wall, "requests": len(prompts)}


# -- server lifecycle ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_num_seqs: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    store = tempfile.mkdtemp(prefix="promptserve-bench-")
    env = {**os.environ, "PROMPTSERVE_STORE_DIR": store, "PROMPTSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
           "PROMPTSERVE_SEED_DIR": "", "PROMPTSERVE_MAX_NUM_SEQS": str(max_num_seqs),
           "PROMPTSERVE_MAX_QUEUE": "100000", "PROMPTSERVE_MAX_MODEL_LEN": "1024"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--log-level", "warning", "serve", "--port", str(port)],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.5)
    raise RuntimeError("server not ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
