"""A checkpoint of real size, served as a user would (`promptserve bench --model DIR`): the server's memory
and its single-client decode against plain transformers and the machine's read-bandwidth ceiling.

    promptserve bench --model DIR [--rows 8] [--context 1024] [--output-len 64]

Phases, on an idle machine: a server with DIR, `rows` KV-cache rows of `context` tokens; its peak resident
memory once ready, then after `rows` clients filled every row to the context at once; one client's decode
speed (median time per output token); then, the server stopped, HF `generate` batch 1 on the same prompts
and the machine's ceiling (every weight read once per token). `benchmarks/tiny_model.py` makes random
checkpoints of real models' shapes (`build_random_checkpoint`).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from benchmarks.roofline import cpu_name, load_baseline, measure_machine, roofline
from benchmarks.server_process import free_port, spawn, stop, wait_ready

ADMIN_TOKEN = "bench-admin"


def process_memory_gb(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in GB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / 1e9
    return {"rss_gb": fields["VmRSS"], "peak_gb": fields["VmHWM"]}


def checkpoint_weight_bytes(directory: Path, dtype_bytes: int = 2) -> int:
    """The checkpoint's weights at dtype_bytes per parameter (bf16: 2), from its safetensors headers."""
    total = 0
    for path in Path(directory).glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n * dtype_bytes
    return total


def filler_prompt(tokenizer, tokens: int, seed: int) -> str:
    """A text of about `tokens` tokens (varied, so no two rows share a prefix)."""
    words = [f"w{(seed * 7919 + i * 104729) % 9973}" for i in range(tokens)]
    text = " ".join(words)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


async def _stream(client: httpx.AsyncClient, task: str, prompt: str, output_len: int, chat: bool = False) -> dict:
    start = time.perf_counter()
    first, count = None, 0
    body = {"max_tokens": output_len, "ignore_eos": True, "stream": True, "temperature": 0,
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    async with client.stream("POST", f"/v1/tasks/{task}", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                first = first or time.perf_counter() - start
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if "usage" in event:
                    count = event["usage"]["completion_tokens"]
    e2e = time.perf_counter() - start
    return {"ttft": first, "e2e": e2e, "tokens": count, "tpot": (e2e - first) / max(count - 1, 1)}


def run(args) -> int:
    import statistics

    import torch
    from transformers import AutoTokenizer

    from app.settings import Settings
    from benchmarks.serving import hf_batched

    directory = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    weights = checkpoint_weight_bytes(directory)
    report: dict = {"model": str(directory), "cpu": cpu_name(), "rows": args.rows, "context": args.context,
                    "weights_bf16_gb": weights / 1e9, "output_len": args.output_len}
    port = free_port()
    env = {"PROMPTSERVE_MODEL": str(directory), "PROMPTSERVE_MAX_NUM_SEQS": str(args.rows),
           "PROMPTSERVE_MAX_MODEL_LEN": str(args.context), "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "PROMPTSERVE_STORE_DIR": f"/tmp/promptserve-size-{port}"}
    proc = spawn(env, port, stdout=None, log_level="warning")
    url = f"http://127.0.0.1:{port}"
    prompt_len = args.context - args.output_len - 8  # every row filled to about the whole context
    fill = [filler_prompt(tokenizer, prompt_len, seed) for seed in range(args.rows)]
    short = [filler_prompt(tokenizer, 64, 100 + k) for k in range(args.requests or 4)]
    try:
        wait_ready(url, proc, timeout=900)
        report["server_ready"] = process_memory_gb(proc.pid)
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        async def phases():
            async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
                t0 = time.perf_counter()
                full = await asyncio.gather(*(_stream(client, base, p, args.output_len) for p in fill))
                report["full_rows"] = {"wall_s": time.perf_counter() - t0,
                                       "output_tok_s": sum(r["tokens"] for r in full) / (time.perf_counter() - t0)}
                report["server_full"] = process_memory_gb(proc.pid)
                one = [await _stream(client, base, p, args.output_len, chat=True) for p in short]
                report["one_client"] = {"decode_tok_s": 1 / statistics.median(r["tpot"] for r in one),
                                        "ttft_p50_s": statistics.median(r["ttft"] for r in one)}
        asyncio.run(phases())
    finally:
        stop(proc, timeout=60)

    # plain transformers on the same prompts, the server stopped: the machine to itself
    loaded, served = load_baseline(Settings(model=str(directory), max_model_len=args.context), weights)
    with torch.inference_mode():
        hf = hf_batched(loaded.model, loaded.tokenizer, [[{"role": "user", "content": p}] for p in short],
                        args.output_len, 1)
    report["hf_batch1"] = hf
    machine = measure_machine(served) if loaded.device.type == "cpu" else None
    ceiling = roofline(loaded, machine, 1, served) if machine else None
    report["roofline"] = {**(machine or {}), "ceiling_tok_s": ceiling}
    one = report["one_client"]["decode_tok_s"]
    peak = max(report["server_ready"]["peak_gb"], report["server_full"]["peak_gb"])
    budget = 1.3 * weights / 1e9 + 1.2
    report["ratios"] = {"one client / HF generate batch 1": one / hf["output_tok_s"],
                        "one client / read-bandwidth ceiling": one / ceiling if ceiling else None,
                        "peak RSS / (1.3 x bf16 weights + 1.2 GB)": peak / budget}
    print(f"\n{directory.name} on {cpu_name()}, {served} (transformers in {loaded.dtype}), {args.rows} rows x "
          f"{args.context} tokens; weights {weights / 1e9:.2f} GB (bf16)")
    print(f"server peak RSS: ready {report['server_ready']['peak_gb']:.2f} GB, after filling every row "
          f"{report['server_full']['peak_gb']:.2f} GB (budget 1.3 x weights + 1.2 GB = {budget:.2f} GB)")
    print(f"one client: {one:.2f} tok/s decode (TTFT p50 {report['one_client']['ttft_p50_s']:.2f} s); "
          f"HF generate batch 1: {hf['output_tok_s']:.2f} tok/s; ceiling {ceiling or float('nan'):.2f} tok/s "
          f"({(machine or {}).get('read_gb_s', float('nan')):.1f} GB/s read)")
    for name, value in report["ratios"].items():
        print(f"  {name}: {value:.2f}" if value is not None else f"  {name}: n/a")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
