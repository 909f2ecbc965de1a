"""The demo of the fine-tuning API: retrain the spam task through OpenAI's endpoints, with the official
`openai` SDK, against a running server (`make serve` with PROMPTSERVE_ADMIN_TOKEN set).

    python scripts/fine_tune_spam_demo.py --url http://127.0.0.1:8000 --token <admin token>

Uploads the demo's SMS training split and its dev split (the validation file), starts a job with every
hyperparameter "auto" (a small learning-rate search on the validation file, the best kept) and
metadata.promote_to "spam" (the result replaces the shipped set only if it scores better on dev), prints the
job's events as they come, then scores the served task on dev through the HTTP API (`promptserve eval`'s
code) and writes the figures to --json."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.evaluate import eval_http  # noqa: E402
from training.presets import DATASETS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="the server's admin token")
    parser.add_argument("--json", default="demo/results/fine_tune_spam.json")
    parser.add_argument("--seed", type=int, default=0, help="the job's seed (OpenAI picks one when none is "
                        "given; the result varies with it)")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.token)
    started = time.time()
    train = client.files.create(file=open(DATASETS / "sms_spam/train.jsonl", "rb"), purpose="fine-tune")
    dev = client.files.create(file=open(DATASETS / "sms_spam/dev.jsonl", "rb"), purpose="fine-tune")
    model = client.models.list().data[0].id
    job = client.fine_tuning.jobs.create(model=model, training_file=train.id, validation_file=dev.id,
                                         suffix="spam", seed=args.seed, metadata={"promote_to": "spam"})
    print(f"{job.id}: {job.status}", flush=True)
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data):
            if event.id not in seen:
                seen.add(event.id)
                if event.type != "metrics" or "valid_f1" in event.data:
                    print(f"  {time.strftime('%H:%M:%S', time.localtime(event.created_at))} {event.message}",
                          flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(5)
    minutes = (time.time() - started) / 60
    print(f"{job.status} in {minutes:.1f} min: {job.fine_tuned_model}", flush=True)
    if job.status != "succeeded":
        return 1
    figures = asyncio.run(eval_http(args.url, "spam", job.fine_tuned_model, False, None, 16))
    report = {"job": job.id, "fine_tuned_model": job.fine_tuned_model, "minutes": round(minutes, 1),
              "hyperparameters": job.hyperparameters.model_dump(), "dev": figures,
              "events": [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data)
                         if e.type != "metrics" or "valid_f1" in e.data]}
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
