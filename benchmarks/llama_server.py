"""llama.cpp's `llama-server` as a baseline of `promptserve bench` (`--llama-server PATH`): the alternative a
CPU user reaches for. Never a dependency: the binary is the user's own build (see the README's performance
section: the llama-cpp-python sdist's vendored sources, cmake -DGGML_NATIVE=ON, target llama-server).

The same workload as the server's phases: the same chat messages, the same output length (ignore_eos),
greedy, streamed, N clients in a closed loop, through llama-server's OpenAI chat endpoint with one slot per
client and continuous batching. The model is the served checkpoint converted to a bf16 GGUF with the
converter that ships beside the binary's sources (`convert_hf_to_gguf.py --outtype bf16`; its Llama path
imports sentencepiece, which this project does not install), or `--llama-gguf`.
It has no prompt sets: it runs the bare model, which favours it (no virtual tokens to attend to).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.server_process import free_port

SLOT_CONTEXT = 1024  # tokens each client's slot holds: the bench's prompts and 64 generated tokens fit


def find_converter(binary: Path) -> Path | None:
    """convert_hf_to_gguf.py in the source tree the binary was built in (build/bin/llama-server)."""
    for parent in binary.resolve().parents:
        candidate = parent / "convert_hf_to_gguf.py"
        if candidate.is_file():
            return candidate
    return None


def bf16_gguf(binary: Path, checkpoint: Path, cache_dir: Path) -> Path:
    """The checkpoint as a bf16 GGUF, converted once (kept in cache_dir, keyed by the checkpoint's path)."""
    out = cache_dir / f"llama-baseline-{checkpoint.name}-bf16.gguf"
    if out.is_file():
        return out
    converter = find_converter(binary)
    if converter is None:
        raise FileNotFoundError(f"no convert_hf_to_gguf.py above {binary}: pass --llama-gguf")
    cache_dir.mkdir(parents=True, exist_ok=True)
    # the converter imports the gguf package beside it first (the version the binary reads)
    env_path = str(converter.parent / "gguf-py")
    done = subprocess.run([sys.executable, str(converter), str(checkpoint), "--outtype", "bf16", "--outfile",
                           str(out)], env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True)
    if done.returncode != 0:  # e.g. its Llama path imports sentencepiece (pip install sentencepiece)
        out.unlink(missing_ok=True)
        raise RuntimeError(f"{converter.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def start(binary: Path, gguf: Path, slots: int, threads: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """extra: more llama-server arguments (e.g. its own speculative decoding)."""
    port = free_port()
    args = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * SLOT_CONTEXT), "-t", str(threads), "-tb", str(threads), "--cont-batching",
            "--jinja", "--no-webui", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become ready in 300 s")


async def one_chat_request(client: httpx.AsyncClient, messages: list[dict], output_len: int,
                           model: str = "baseline") -> dict:
    """One streamed chat completion on an OpenAI endpoint; tokens from the usage chunk, else one per delta."""
    start = time.perf_counter()
    first, deltas, usage = None, 0, None
    body = {"model": model, "messages": messages, "max_tokens": output_len, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code, "tokens": 0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        if first is None:
                            first = time.perf_counter() - start
                        deltas += 1
    except httpx.HTTPError as exc:
        return {"ok": False, "status": repr(exc), "tokens": 0}
    tokens = usage["completion_tokens"] if usage else deltas
    return {"ok": tokens == output_len, "ttft": first, "e2e": time.perf_counter() - start, "tokens": tokens}
