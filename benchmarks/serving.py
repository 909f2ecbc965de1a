"""`promptserve bench`: a serving benchmark against plain-transformers baselines, in one run.

Phases against a live server (started here unless --url is given), all with a fixed output length
(ignore_eos) and streamed responses so time-to-first-token is measured:
  sweep      closed loop of N clients for each concurrency, tasks mixed in the chosen proportions; or,
             with --rate, Poisson arrivals at each rate (plus one closed loop at the top concurrency,
             which the ratios use)
  single     the top concurrency with every request on one task
  many       1,000 registered prompt sets, each request picking one at random
  upload     a new version uploaded under load: time until it is served, and failed requests
Baselines, in-process after the server has stopped (same prompts and lengths; the served dtype, except bf16
on a CPU without native bf16 matmuls, where transformers runs float32, its best there: roofline.baseline_dtype):
  HF generate on the bare model with batch = top concurrency, and with batch 1; per-request generate
  with the prompt set prepended through inputs_embeds (what a P-Tuning tutorial would have you write).
Prints a table with ratios, writes JSON, draws a PNG of throughput and latency against concurrency.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import json
import logging
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from app.settings import DEMO_PROMPT_SETS
from benchmarks.roofline import cpu_name, describe, load_baseline, measure_machine, roofline
from benchmarks.server_process import free_port, spawn, stop, wait_ready
from training.data import read_jsonl
from training.presets import DATASETS, DEMO

# The benchmark's sets: the shipped ner and spam sets (deep) and an `input` chat set, so a mix serves both
# kinds and the inputs_embeds baseline has virtual tokens to prepend. The shipped chat set is deep since
# issue 15; this is the input set shipped before it (the same bytes), so figures stay comparable.
BENCH_SETS = {"chat": DEMO / "trained/chat-input.safetensors", "ner": DEMO_PROMPT_SETS / "ner.safetensors",
              "spam": DEMO_PROMPT_SETS / "spam.safetensors"}

ADMIN_TOKEN = "bench-admin"
logging.getLogger("httpx").setLevel(logging.WARNING)


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
                if first is None:
                    first = time.perf_counter() - start
                # the client shares the machine with the server: parse only the events that matter
                if '"usage"' not in line and '"error"' not in line:
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"ok": False, "status": event["error"]["status"], "tokens": 0}
                version = event["prompt_set"]["version"]
                tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"ok": False, "status": repr(exc), "tokens": 0}
    return {"ok": tokens == output_len, "ttft": first, "e2e": time.perf_counter() - start, "tokens": tokens,
            "version": version}


async def closed_loop(url: str, jobs: list[Job], concurrency: int, output_len: int, request=None) -> dict:
    """N clients, each sending the next job when its last one ends. request(client, job, output_len): how a
    job is sent (default: this server's task endpoint)."""
    request = request or one_request
    queue = list(jobs)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                records.append(await request(client, queue.pop(), output_len))

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
def bench_prompt_sets(spec_fingerprint: str, sets: dict[str, Path] | None = None) -> dict[str, bytes]:
    """Generate-type prompt sets built from BENCH_SETS (or `sets`), so that the benchmark mixes kinds
    (chat: input; ner and spam: deep) without changing what the demo tasks are."""
    from prompt_store import format as psf

    out = {}
    for name, path in (sets or BENCH_SETS).items():
        ps = psf.load(path)
        tensors = {k: v for k, v in ps.tensors.items() if not k.startswith("head.")}
        meta = psf.PromptSetMeta(kind=ps.kind, num_virtual_tokens=ps.meta.num_virtual_tokens, task_type="generate",
                                 base_model=spec_fingerprint, description=f"benchmark copy of {name}")
        out[f"bench-{name}"] = psf.PromptSet(meta, tensors).to_bytes()
    return out


def upload_bench_sets(url: str) -> tuple[dict, dict[str, bytes]]:
    """The benchmark's prompt sets, made for the server's base model and uploaded (bench-chat, bench-ner,
    bench-spam): the base model's card (its id and fingerprint), and the sets by task name."""
    base = httpx.get(f"{url}/v1/models").json()["data"][0]
    sets = bench_prompt_sets(base["fingerprint"])

    async def setup():
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for name, data in sets.items():
                await upload(client, name, data)
    asyncio.run(setup())
    return base, sets


def many_prompt_sets(base: bytes, n: int, seed: int = 0):
    from prompt_store import format as psf

    ps = psf.parse(base)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        tensors = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in ps.tensors.items()}
        yield f"many-{i:04d}", psf.PromptSet(ps.meta, tensors).to_bytes()


def new_versions(data: bytes):
    """Distinct files from one prompt set (the same tensors, a numbered description): the same bytes
    again would be answered with the stored version instead of a new one."""
    from dataclasses import replace

    from prompt_store import format as psf

    ps = psf.parse(data)
    for i in itertools.count(1):
        meta = replace(ps.meta, description=f"{ps.meta.description} (upload {i})")
        yield psf.PromptSet(meta, ps.tensors).to_bytes()


async def upload(client: httpx.AsyncClient, name: str, data: bytes) -> dict:
    r = await client.put(f"/admin/prompt-sets/{name}", content=data,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    r.raise_for_status()
    return r.json()


async def first_token_after(client: httpx.AsyncClient, task: str, since: float) -> tuple[float, int | None]:
    """Stream a one-token request; return (seconds from `since` to its first event, prompt-set version)."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    first, version = None, None
    async with client.stream("POST", f"/v1/tasks/{task}", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or time.perf_counter() - since
            event = json.loads(line[6:])
            version = event.get("prompt_set", {}).get("version", version)
    return first, version


async def upload_under_load(url: str, jobs: list[Job], concurrency: int, output_len: int, data: bytes,
                            trials: int = 10, seed: int = 0, settle_s: float = 3.0) -> dict:
    """Upload new versions of bench-chat while `concurrency` clients keep the server busy.

    Right after each upload's answer one request goes to bench-chat: the version is servable when that
    request runs it (not the old one), and its first token comes as soon as a request's does at this load.
    That load's own first-token time is measured by a control request to an unchanged task (bench-spam)
    sent at another random moment of the same trial: it is what any request waits (the step in flight,
    then its own prefill). The control is not sent together with the probe: batched into the same step,
    it would share any delay the new version caused and hide it."""
    rng = random.Random(seed)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        load = asyncio.create_task(closed_loop_until(client, jobs, concurrency, output_len, records))
        await asyncio.sleep(settle_s)  # let the load reach its steady state
        trials_out = []
        versions = new_versions(data)
        for _ in range(trials):
            await asyncio.sleep(rng.uniform(0.5, 1.5))  # land at random points of the load's steps
            sent = time.perf_counter()
            info = await upload(client, "bench-chat", next(versions))
            answered = time.perf_counter()
            new_s, version = await first_token_after(client, "bench-chat", answered)
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            control_s, _ = await first_token_after(client, "bench-spam", time.perf_counter())
            trials_out.append({"new_version": info["version"], "version_served": version, "upload_s": answered - sent,
                               "first_token_s": new_s, "control_first_token_s": control_s})
        load.cancel()
        try:
            await load
        except asyncio.CancelledError:
            pass
    first = [t["first_token_s"] for t in trials_out]
    control = [t["control_first_token_s"] for t in trials_out]
    return {"concurrency": concurrency, "trials": trials_out,
            "all_served_new_version": all(t["version_served"] == t["new_version"] for t in trials_out),
            "first_token_p50_s": statistics.median(first), "first_token_max_s": max(first),
            "control_first_token_p50_s": statistics.median(control), "control_first_token_max_s": max(control),
            "extra_p50_s": statistics.median(first) - statistics.median(control),
            "upload_p50_s": statistics.median(t["upload_s"] for t in trials_out),
            "load_requests": len(records), "failed_requests": sum(not r["ok"] for r in records)}


async def closed_loop_until(client: httpx.AsyncClient, jobs: list[Job], concurrency: int, output_len: int,
                            records: list[dict]) -> None:
    """Keep `concurrency` requests in flight, cycling through jobs, until cancelled."""
    counter = iter(range(1 << 62))

    async def worker():
        while True:
            records.append(await one_request(client, jobs[next(counter) % len(jobs)], output_len))
    await asyncio.gather(*(worker() for _ in range(concurrency)))


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
def start_server(max_num_seqs: int, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    store = tempfile.mkdtemp(prefix="promptserve-bench-")
    atexit.register(shutil.rmtree, store, True)  # the run's prompt sets: gone when the benchmark exits
    env = {"PROMPTSERVE_STORE_DIR": store, "PROMPTSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
           "PROMPTSERVE_SEED_DIR": "", "PROMPTSERVE_MAX_NUM_SEQS": str(max_num_seqs),
           "PROMPTSERVE_MAX_QUEUE": "100000", "PROMPTSERVE_MAX_MODEL_LEN": "1024", **(extra_env or {})}
    proc = spawn(env, port, stdout=None, log_level="warning")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, timeout=300)
    return proc, url


@contextlib.contextmanager
def busy_neighbours(n: int, seconds: float):
    """n processes that each keep a core busy (a loop that ends by itself after `seconds`): a neighbour's load
    on shared cores. Stopped when the block ends."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(0.5)  # running before the phase starts
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# -- the whole run ------------------------------------------------------------------------------
def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = "rate" if "rate" in sweep[0] else "concurrency"
    label = "arrival rate (requests/s)" if axis == "rate" else "concurrent clients"
    c = [s[axis] for s in sweep]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [s["output_tok_s"] for s in sweep], "o-")
    a.set(xlabel=label, ylabel="output tokens/s", title="throughput", xscale="log")
    for key, name in (("ttft_p50", "TTFT p50"), ("e2e_p50", "end-to-end p50"), ("e2e_p99", "end-to-end p99")):
        b.plot(c, [s[key] for s in sweep], "o-", label=name)
    b.set(xlabel=label, ylabel="seconds", title="latency", xscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def llama_baseline(args, jobs: list[Job], concurrencies: list[int]) -> dict:
    """llama.cpp's llama-server on the same messages (bare model, bf16 GGUF), one closed loop per concurrency
    (1 and the top one), alone on the machine like the other baselines."""
    from app.engine.threads import usable_cpus
    from app.model.source import resolve_checkpoint
    from app.settings import Settings
    from benchmarks import llama_server

    binary = Path(args.llama_server)
    settings = Settings()
    gguf = Path(args.llama_gguf) if args.llama_gguf else \
        llama_server.bf16_gguf(binary, resolve_checkpoint(settings.model, settings.cache_dir)[0], settings.cache_dir)
    out = {}
    for c in sorted({min(concurrencies), max(concurrencies)}):
        proc, url = llama_server.start(binary, gguf, slots=max(c, 1), threads=usable_cpus(),
                                       extra=shlex.split(args.llama_args))
        try:
            batch = jobs if c > 1 else jobs[:4]
            asyncio.run(closed_loop(url, batch[:2], 2, 4, _llama_request))  # warm it up
            stats = asyncio.run(closed_loop(url, batch, c, args.output_len, _llama_request))
        finally:
            proc.terminate()
            proc.wait(30)
        out[c] = {**stats, "slots": max(c, 1), "gguf": str(gguf), "args": args.llama_args}
        print(f"llama-server c={c}: {stats['output_tok_s']:.1f} tok/s, decode "
              f"{stats['decode_tok_s_per_request']:.1f} tok/s per request, failed {stats['failed']}", flush=True)
    return out


async def _llama_request(client: httpx.AsyncClient, job: Job, output_len: int) -> dict:
    from benchmarks.llama_server import one_chat_request
    return await one_chat_request(client, job.messages, output_len)


async def _openai_request(client: httpx.AsyncClient, job: Job, output_len: int, model: str) -> dict:
    """A job's messages as a chat completion of `model` (--bare: this server's bare model)."""
    from benchmarks.llama_server import one_chat_request
    return await one_chat_request(client, job.messages, output_len, model=model)


def bare_model(url: str) -> str:
    """The id this server gives its bare model (GET /v1/models: the card without a `root`; tasks have one)."""
    listed = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return next(m["id"] for m in listed if "root" not in m)


def phase_line(name: str, stats: dict) -> str:
    """One table row: throughput, then TTFT / TPOT / end-to-end latency at p50, p90, p99."""
    def ps(key: str, scale: float = 1.0) -> str:
        return " / ".join(f"{stats[f'{key}_p{p}'] * scale:.{0 if scale > 1 else 2}f}" for p in (50, 90, 99))
    return (f"| {name} | {stats['output_tok_s']:.1f} | {stats['req_s']:.2f} | {ps('ttft')} | {ps('tpot', 1000)} | "
            f"{ps('e2e')} | {stats['failed']} |")


def main(args) -> int:

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    top = max(concurrencies)
    mix = {k: float(v) for k, v in (p.split(":") for p in args.mix.split(","))}
    n = args.requests or top
    prompts = load_prompts(max(n, 64), seed=args.seed)
    report: dict = {"output_len": args.output_len, "mix": mix, "requests_per_phase": n}

    server_env = dict(kv.split("=", 1) for kv in args.server_env.split(",") if kv)
    proc, url = (None, args.url) if args.url else start_server(top, server_env)
    if server_env:
        report["server_env"] = server_env
    try:
        _, sets = upload_bench_sets(url)
        tasks = {k: f"bench-{k}" for k in mix}
        jobs = mixed_jobs(prompts, tasks, mix, n, args.seed)
        asyncio.run(closed_loop(url, jobs[:4], 4, 4))  # warm the prefix cache and the allocator

        def progress(label: str, stats: dict) -> None:
            print(f"{label}: {stats['output_tok_s']:.1f} tok/s, ttft p50 {stats['ttft_p50']:.3f}s, "
                  f"e2e p50 {stats['e2e_p50']:.2f}s, failed {stats['failed']}", flush=True)

        sweep = []
        if args.rate:  # open loop: Poisson arrivals at each rate
            for rate in (float(r) for r in args.rate.split(",")):
                stats = asyncio.run(poisson(url, jobs, rate, args.output_len, args.seed))
                sweep.append({"rate": rate, **stats})
                progress(f"sweep rate={rate:g}/s", stats)
        closed = []  # the ratios' closed loops: the sweep itself, or only the top concurrency after a rate sweep
        # --bare: the same messages to the bare model, as an OpenAI client (and llama-server's baseline) sends them
        request = functools.partial(_openai_request, model=bare_model(url)) if args.bare else None
        for c in [top] if args.rate else concurrencies:
            stats = asyncio.run(closed_loop(url, jobs if c > 1 else jobs[:4], c, args.output_len, request))
            closed.append({"concurrency": c, **stats})
            progress(f"closed loop c={c}", stats)
        sweep = sweep or closed
        report["closed_loop"] = closed
        report["sweep"] = sweep
        if args.server_only:  # the perf workload alone (make docker-smoke compares the image and make serve)
            Path(args.json).write_text(json.dumps(report, indent=2))
            print("\n| server phase | output tok/s | req/s | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) | "
                  "end-to-end p50/p90/p99 (s) | failed |\n|---|---|---|---|---|---|---|")
            for s in closed:
                print(phase_line(f"{s['concurrency']} clients", s))
            return 0
        if args.bare:
            print("--bare: the phases about prompt sets (one task, many prompt sets, an upload under load) are "
                  "not run", flush=True)
        else:
            _prompt_set_phases(args, url, report, jobs, prompts, tasks, sets, n, top)
    finally:
        if proc is not None:
            stop(proc, timeout=60)
    _baselines_and_report(args, report, jobs, closed, sweep, concurrencies, top)
    return 0


def _prompt_set_phases(args, url: str, report: dict, jobs: list[Job], prompts, tasks: dict, sets: dict, n: int,
                       top: int) -> None:
    """The phases beside the mixed closed loops: one task alone, busy neighbours, many prompt sets, an upload
    under load (none with --bare: they send the task mix)."""
    first = next(iter(tasks))
    # the mixed phase's own prompts, all sent to one task: the ratio then isolates mixing prompt sets in
    # a batch. (Its own task's prompts differed in length and, drawn from the chat task's 50, repeated
    # more often, which the prompt cache finds whole.)
    single = [Job(tasks[first], job.messages) for job in jobs]
    report["single_task"] = asyncio.run(closed_loop(url, single, top, args.output_len))
    print(f"single task ({first}): {report['single_task']['output_tok_s']:.1f} tok/s", flush=True)
    if args.neighbours:  # the same mixed closed loop with busy processes on the same cores
        with busy_neighbours(args.neighbours, seconds=1800):
            report["neighbours"] = asyncio.run(closed_loop(url, jobs, top, args.output_len))
        print(f"{top} clients beside {args.neighbours} busy processes: "
              f"{report['neighbours']['output_tok_s']:.1f} tok/s", flush=True)

    if args.many:
        async def register_many():
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:
                names = []
                for name, data in many_prompt_sets(sets["bench-ner"], args.many, args.seed):
                    await upload(client, name, data)
                    names.append(name)
                return names
        t0 = time.perf_counter()
        names = asyncio.run(register_many())
        report["many_register_s"] = time.perf_counter() - t0
        rng = random.Random(args.seed)
        many_jobs = [Job(rng.choice(names), prompts["ner"][i]) for i in range(n)]
        one_jobs = [Job(tasks.get("ner", tasks[first]), prompts["ner"][i]) for i in range(n)]
        report["one_prompt_set"] = asyncio.run(closed_loop(url, one_jobs, top, args.output_len))
        report["many_prompt_sets"] = asyncio.run(closed_loop(url, many_jobs, top, args.output_len))
        print(f"1 prompt set: {report['one_prompt_set']['output_tok_s']:.1f} tok/s; {args.many} prompt sets: "
              f"{report['many_prompt_sets']['output_tok_s']:.1f} tok/s", flush=True)
    report["upload_under_load"] = asyncio.run(upload_under_load(
        url, jobs, min(top, 16), args.output_len, sets["bench-chat"]))
    u = report["upload_under_load"]
    print(f"upload under load ({u['concurrency']} clients, {len(u['trials'])} uploads): first request ran the "
          f"new version: {u['all_served_new_version']}; its first token {u['first_token_p50_s'] * 1000:.0f} ms "
          f"after the answer vs {u['control_first_token_p50_s'] * 1000:.0f} ms for an unchanged task "
          f"(p50 difference {u['extra_p50_s'] * 1000:+.0f} ms); "
          f"{u['failed_requests']} of {u['load_requests']} load requests failed", flush=True)


def _baselines_and_report(args, report: dict, jobs: list[Job], closed: list[dict], sweep: list[dict],
                          concurrencies: list[int], top: int) -> None:
    """The baselines, with the server stopped so they have the machine to themselves; then the ratios, the
    tables and the files."""
    from app.settings import Settings

    if args.llama_server:
        report["llama_server"] = llama_baseline(args, jobs, concurrencies)
    loaded, served = load_baseline(Settings())
    hf_dtype = str(loaded.dtype).removeprefix("torch.")
    report["hf_dtype"] = hf_dtype
    model, tok = loaded.model, loaded.tokenizer
    base_prompts = [j.messages for j in jobs]
    report["hf_batch"] = hf_batched(model, tok, base_prompts, args.output_len, top)
    report["hf_batch1"] = hf_batched(model, tok, base_prompts[:args.baseline_requests], args.output_len, 1)
    from prompt_store import format as psf
    emb = psf.load(BENCH_SETS["chat"]).tensors["embeddings"]
    report["hf_inputs_embeds"] = hf_inputs_embeds_per_request(model, tok, emb, base_prompts[:args.baseline_requests],
                                                              args.output_len)
    top_stats = next(s for s in closed if s["concurrency"] == top)
    one = next((s for s in closed if s["concurrency"] == 1), None)
    rate = top_stats["output_tok_s"]
    ratios = {f"server {top} clients {'bare model' if args.bare else 'mixed'} / HF generate batch {top}":
              rate / report["hf_batch"]["output_tok_s"]}
    if "single_task" in report:
        ratios["mixed / single task (same concurrency)"] = rate / report["single_task"]["output_tok_s"]
    ratios[f"server {top} clients / per-request inputs_embeds"] = rate / report["hf_inputs_embeds"]["output_tok_s"]
    if one:
        ratios["one client decode / HF generate batch 1"] = \
            one["decode_tok_s_per_request"] / report["hf_batch1"]["output_tok_s"]
    for c, stats in (report.get("llama_server") or {}).items():
        ours = next((s for s in closed if s["concurrency"] == c), None)
        if ours is not None and c == 1:
            ratios["one client decode / llama-server one client"] = \
                ours["decode_tok_s_per_request"] / stats["decode_tok_s_per_request"]
        elif ours is not None:
            ratios[f"server {c} clients / llama-server {c} clients"] = ours["output_tok_s"] / stats["output_tok_s"]
    if "neighbours" in report:
        ratios[f"{top} clients beside {args.neighbours} busy processes / alone"] = (
            report["neighbours"]["output_tok_s"] / top_stats["output_tok_s"])
    if "many_prompt_sets" in report:
        ratios[f"{args.many} prompt sets / one prompt set"] = (report["many_prompt_sets"]["output_tok_s"]
                                                               / report["one_prompt_set"]["output_tok_s"])
    report["ratios"] = ratios
    report["device"] = f"{loaded.device} {served} torch {torch.__version__} threads {torch.get_num_threads()}"
    # the ceiling this machine allows the model, measured with the server stopped, and each result against it
    machine = measure_machine(served) if loaded.device.type == "cpu" else None
    if machine:
        ceilings = {b: roofline(loaded, machine, b, served) for b in sorted({1, top})}
        report["roofline"] = {**machine, "cpu": cpu_name(), "ceiling_tok_s": ceilings}

    phases = "the bare model" if args.bare else "mixed tasks unless said"
    print(f"\n| server phase ({phases}) | output tok/s | req/s | TTFT p50/p90/p99 (s) | "
          "TPOT p50/p90/p99 (ms) | end-to-end p50/p90/p99 (s) | failed |\n|---|---|---|---|---|---|---|")
    for s in sweep if args.rate else []:
        print(phase_line(f"Poisson {s['rate']:g} req/s", s))
    for s in closed:
        print(phase_line(f"{s['concurrency']} clients", s))
    if "single_task" in report:
        print(phase_line(f"{top} clients, one task", report["single_task"]))
    if "neighbours" in report:
        print(phase_line(f"{top} clients beside {args.neighbours} busy processes", report["neighbours"]))
    if "many_prompt_sets" in report:
        print(phase_line(f"{top} clients, one prompt set", report["one_prompt_set"]))
        print(phase_line(f"{top} clients, {args.many} prompt sets", report["many_prompt_sets"]))
    print(f"\n| baseline (in-process, server stopped; transformers in {hf_dtype}) | output tok/s |\n|---|---|")
    for key, label in (("hf_batch", f"HF generate, bare model, batch {top}"), ("hf_batch1", "HF generate, batch 1"),
                       ("hf_inputs_embeds", "HF generate per request, inputs_embeds")):
        print(f"| {label} | {report[key]['output_tok_s']:.1f} |")
    for c, stats in (report.get("llama_server") or {}).items():
        extra = f", {stats['args']}" if stats.get("args") else ""
        print(f"| llama.cpp llama-server bf16, {c} clients (bare model, {stats['slots']} slots{extra}) | "
              f"{stats['output_tok_s']:.1f} (decode {stats['decode_tok_s_per_request']:.1f} per request) |")
    print("\n| ratio | value | goal |\n|---|---|---|")
    # the first key a ratio's name contains gives its goal ("batch 1" before the wider "HF generate batch")
    goals = {"batch 1": 2.0, "HF generate batch": 2.5, "single task": 0.95, "inputs_embeds": 10.0,
             "one prompt set": 0.9, "busy processes": 0.35, "llama-server one client": 1.2}
    for k, v in ratios.items():
        goal = next((g for key, g in goals.items() if key in k), None)
        print(f"| {k} | {v:.2f}x | {f'>= {goal}x' if goal is not None else '-'} |")
    if machine:
        print(f"\nroofline ({report['roofline']['cpu']}): {describe(machine)} -> ceiling " + ", ".join(
                  f"batch {b} {c:.0f} tok/s" for b, c in ceilings.items()))
        reached = [(f"{top} clients", top_stats["output_tok_s"], ceilings[top])]
        if one:
            reached.append(("1 client (decode)", one["decode_tok_s_per_request"], ceilings[1]))
        reached += [(f"HF generate batch {top}", report["hf_batch"]["output_tok_s"], ceilings[top]),
                    ("HF generate batch 1", report["hf_batch1"]["output_tok_s"], ceilings[1])]
        print("| result | tok/s | of the ceiling |\n|---|---|---|")
        for label, value, ceiling in reached:
            print(f"| {label} | {value:.1f} | {100 * value / ceiling:.0f}% |")
    Path(args.json).write_text(json.dumps(report, indent=2))
    plot(sweep, Path(args.plot))
    print(f"\nwrote {args.json} and {args.plot}")
