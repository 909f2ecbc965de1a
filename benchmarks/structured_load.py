"""What constrained requests cost their unconstrained neighbours in the mixed batch.

    python -m benchmarks.structured_load [--clients 64] [--seconds 40] [--max-tokens 48]

One `promptserve serve` on the embedded SmolLM2. Two runs of the same length, each with `--clients`
streaming chat clients looping requests (the unconstrained ones `--max-tokens` long each):
  B. a third of the clients ask for a JSON schema (response_format json_schema, strict);
  A. the same clients, the third now unconstrained but as long as their constrained answers were on
     average in B (a JSON answer ends early: without this, B would also pay for more prefills).
The figure is the decode throughput per unconstrained client (completion tokens per second) in B against
A: the same rows in the batch and the same request churn, so the difference is what the constrained rows'
grammars cost the step. Every constrained answer is also checked to be valid against its schema. Prints
the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.roofline import cpu_name
from benchmarks.server_process import free_port, spawn, stop, wait_ready

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags", "size"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "kind": {"type": "string", "enum": ["fruit", "tool", "animal"]},
                         "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}},
                         "size": {"type": "integer", "minimum": 0, "maximum": 1000}}}


async def client_loop(http: httpx.AsyncClient, base: str, constrained: bool, until: float, max_tokens: int,
                      stats: dict) -> None:
    """Loop requests until `until`; a constrained client asks for SCHEMA (then max_tokens only bounds it)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Describe one thing you like."}],
            "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                                          "strict": True}}
    else:
        body["ignore_eos"] = True
    seed = 0
    stats.setdefault("completion_tokens", [])
    while time.monotonic() < until:
        seed += 1
        text, finish = [], None
        async with http.stream("POST", f"{base}/v1/chat/completions", json={**body, "seed": seed}) as r:
            if r.status_code != 200:
                stats["failed"] += 1
                continue
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stats["failed"] += 1
                    break
                if event.get("usage"):
                    stats["completion_tokens"].append(event["usage"]["completion_tokens"])
                for choice in event.get("choices", []):
                    text.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
                    # tokens counted as they arrive, so a request cut by the run's end still counts its part
                    if choice["delta"].get("content") and time.monotonic() < until:
                        stats["tokens"] += 1
        stats["requests"] += 1
        if constrained and finish == "stop":
            import jsonschema
            try:
                jsonschema.validate(json.loads("".join(text)), SCHEMA)
                stats["valid"] += 1
            except (ValueError, jsonschema.ValidationError):
                stats["invalid"] += 1


async def run_phase(base: str, clients: int, constrained: int, seconds: float, max_tokens: int,
                    short: tuple[int, int] = (0, 0)) -> dict:
    """`constrained` clients ask for the schema; `short` = (clients, tokens): that many further clients ask
    for unconstrained answers of that length (run A's stand-ins for the constrained clients)."""
    until = time.monotonic() + seconds
    plain = {"tokens": 0, "requests": 0, "failed": 0}
    strict = {"tokens": 0, "requests": 0, "failed": 0, "valid": 0, "invalid": 0}
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        stand_ins = {"tokens": 0, "requests": 0, "failed": 0}
        await asyncio.gather(
            *(client_loop(http, base, True, until, max_tokens, strict) for _ in range(constrained)),
            *(client_loop(http, base, False, until, short[1], stand_ins) for _ in range(short[0])),
            *(client_loop(http, base, False, until, max_tokens, plain)
              for _ in range(clients - constrained - short[0])))
    unconstrained = clients - constrained - short[0]
    return {"clients": clients, "constrained_clients": constrained, "seconds": seconds,
            "unconstrained": plain, "constrained": strict,
            "tokens_per_s_per_unconstrained_client": plain["tokens"] / seconds / unconstrained}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", default="demo/results/structured_load.json")
    args = parser.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        proc = spawn({"PROMPTSERVE_STORE_DIR": store, "PROMPTSERVE_SEED_DIR": "",
                      "PROMPTSERVE_MAX_NUM_SEQS": str(args.clients)}, port)
        try:
            wait_ready(base, proc)
            asyncio.run(run_phase(base, 8, 3, 5, 16))  # warm-up: grammar compiled, kernels touched
            third = args.clients // 3
            b = asyncio.run(run_phase(base, args.clients, third, args.seconds, args.max_tokens))
            lengths = b["constrained"]["completion_tokens"]
            mean = max(1, round(sum(lengths) / max(len(lengths), 1)))
            a = asyncio.run(run_phase(base, args.clients, 0, args.seconds, args.max_tokens, short=(third, mean)))
            a["stand_in_tokens"] = mean
        finally:
            stop(proc)
    ratio = b["tokens_per_s_per_unconstrained_client"] / a["tokens_per_s_per_unconstrained_client"]
    result = {"cpu": cpu_name(), "model": MODEL, "without_constrained": a, "with_a_third_constrained": b,
              "unconstrained_throughput_ratio": ratio}
    print(f"CPU: {result['cpu']}")
    print(f"A (no grammar; {args.clients // 3} clients ask for {a['stand_in_tokens']}-token answers instead): "
          f"{a['tokens_per_s_per_unconstrained_client']:.2f} tok/s per unconstrained client, "
          f"{a['unconstrained']['failed']} failed")
    print(f"B ({b['constrained_clients']} of {args.clients} json_schema): "
          f"{b['tokens_per_s_per_unconstrained_client']:.2f} tok/s per unconstrained client, "
          f"{b['unconstrained']['failed'] + b['constrained']['failed']} failed; constrained answers: "
          f"{b['constrained']['valid']} valid, {b['constrained']['invalid']} invalid")
    print(f"unconstrained throughput B/A: {ratio:.3f} (goal: >= 0.90)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ok = ratio >= 0.9 and b["constrained"]["invalid"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
