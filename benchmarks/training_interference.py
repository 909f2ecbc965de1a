"""What a fine-tuning job costs the requests being served: `promptserve bench --during-training`.

One server (its training worker beside it, at the settings it ships with), the benchmark's mixed tasks at N
closed-loop clients: a phase with no job, a phase while a job trains the demo spam set (the job is running
all through it: checked before and after), and a phase after the job is cancelled. TPOT p50 while training
against the mean of the two phases without, and the steps the job made meanwhile."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from benchmarks.serving import (
    ADMIN_TOKEN,
    closed_loop,
    load_prompts,
    mixed_jobs,
    phase_line,
    start_server,
    stop,
    upload_bench_sets,
)
from training.presets import DATASETS

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _job_steps(url: str, job_id: str) -> tuple[str, int]:
    job = httpx.get(f"{url}/v1/fine_tuning/jobs/{job_id}", headers=AUTH).json()
    return job["status"], (job.get("progress") or {}).get("step", 0)


def start_job(url: str, model: str) -> str:
    data = (DATASETS / "sms_spam/train.jsonl").read_bytes()
    file_id = httpx.post(f"{url}/v1/files", headers=AUTH, files={"file": ("spam.jsonl", data)},
                         data={"purpose": "fine-tune"}, timeout=60).json()["id"]
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", headers=AUTH, timeout=60, json={
        "model": model, "training_file": file_id, "suffix": "bench",
        "hyperparameters": {"n_epochs": 10, "batch_size": 16, "learning_rate_multiplier": 1}}).json()
    return job["id"]


def main(args) -> int:
    clients = int(args.concurrency.split(",")[-1])
    n = args.requests or 4 * clients
    proc, url = start_server(clients, {"PROMPTSERVE_TRAINING_POLL_SECONDS": "0.5"})
    report: dict = {"clients": clients, "requests_per_phase": n, "output_len": args.output_len}
    try:
        base, _ = upload_bench_sets(url)
        mix = {k: float(v) for k, v in (p.split(":") for p in args.mix.split(","))}
        jobs = mixed_jobs(load_prompts(max(n, 64), args.seed), {k: f"bench-{k}" for k in mix}, mix, n, args.seed)
        asyncio.run(closed_loop(url, jobs[:4], 4, 4))  # warm up

        def phase(name: str) -> dict:
            stats = asyncio.run(closed_loop(url, jobs, clients, args.output_len))
            print(f"{name}: {stats['output_tok_s']:.1f} tok/s, TPOT p50 {stats['tpot_p50'] * 1000:.1f} ms", flush=True)
            return stats

        report["before"] = phase("no job")
        job_id = start_job(url, base["id"])
        deadline = time.time() + 300
        while _job_steps(url, job_id)[1] < 1:  # the worker has loaded the model and is training
            if time.time() > deadline:
                raise RuntimeError(f"job {job_id} did not start training: {_job_steps(url, job_id)}")
            time.sleep(1)
        status, steps_before = _job_steps(url, job_id)
        started = time.time()
        report["during"] = phase("while a job trains")
        status_after, steps_after = _job_steps(url, job_id)
        seconds = time.time() - started
        if status != "running" or status_after != "running":
            raise RuntimeError(f"the job was not running all through the phase ({status} -> {status_after})")
        report["training_steps_during"] = steps_after - steps_before
        report["training_steps_per_s"] = (steps_after - steps_before) / seconds
        httpx.post(f"{url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH)
        time.sleep(3)
        report["after"] = phase("after the job (cancelled)")
    finally:
        if proc is not None:
            stop(proc)
    without = (report["before"]["tpot_p50"] + report["after"]["tpot_p50"]) / 2
    report["tpot_p50_ratio"] = report["during"]["tpot_p50"] / without
    report["throughput_ratio"] = report["during"]["output_tok_s"] / (
        (report["before"]["output_tok_s"] + report["after"]["output_tok_s"]) / 2)
    print("\n| phase | output tok/s | req/s | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) | "
          "end-to-end p50/p90/p99 (s) | failed |\n|---|---|---|---|---|---|---|")
    for key, name in (("before", "no job"), ("during", "a job training"), ("after", "after (cancelled)")):
        print(phase_line(f"{clients} clients, {name}", report[key]))
    print(f"\nTPOT p50 while training / without: {report['tpot_p50_ratio']:.2f}x (goal <= 1.5x); "
          f"throughput {report['throughput_ratio']:.2f}x; the job trained {report['training_steps_during']} steps "
          f"({report['training_steps_per_s']:.2f}/s) meanwhile")
    Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
