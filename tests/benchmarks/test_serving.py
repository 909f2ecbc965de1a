"""The benchmark's measurements themselves, against a live server on the tiny model."""

import asyncio
import functools

import httpx

from benchmarks import serving
from benchmarks.serving import Job, closed_loop, percentile, summarize, upload_under_load
from tests.helpers import input_prompt_set, random_deep_prompt_set


def test_percentile_and_summary():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 90) == 1.9
    records = [{"ok": True, "tokens": 5, "ttft": 0.1, "e2e": 0.5}, {"ok": False, "status": 503, "tokens": 0}]
    out = summarize(records, wall=2.0)
    assert out["failed"] == 1 and out["output_tok_s"] == 2.5 and out["tpot_p50"] == 0.1


def test_closed_loop_and_upload_under_load(live_server, tiny, monkeypatch):
    url, _ = live_server
    monkeypatch.setattr(serving, "ADMIN_TOKEN", "s3cret")
    chat = input_prompt_set(tiny.spec, 4, seed=1).to_bytes(tiny.spec)
    spam = random_deep_prompt_set(tiny.spec, 3, seed=2, scale=0.5).to_bytes(tiny.spec)

    async def scenario():
        import httpx
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await serving.upload(client, "bench-chat", chat)
            await serving.upload(client, "bench-spam", spam)
        jobs = [Job(t, [{"role": "user", "content": f"Say something about {i}"}])
                for i, t in enumerate(["bench-chat", "bench-spam"] * 3)]
        loop_stats = await closed_loop(url, jobs, 2, 4)
        return loop_stats, await upload_under_load(url, jobs, 2, 4, chat, trials=2, settle_s=0.2)

    loop_stats, u = asyncio.run(scenario())
    assert loop_stats["requests"] == 6 and loop_stats["failed"] == 0 and loop_stats["output_tok_s"] > 0
    assert [t["new_version"] for t in u["trials"]] == [2, 3]
    assert u["all_served_new_version"] and u["failed_requests"] == 0 and u["load_requests"] > 0
    assert all(t["first_token_s"] > 0 and t["control_first_token_s"] > 0 for t in u["trials"])


def test_bare_requests_reach_the_bare_model_as_openai_chat_completions(live_server, tiny):
    """--bare: the closed loops send the jobs' messages to the server's bare model (what llama-server gets)."""
    url, _ = live_server
    model = serving.bare_model(url)
    cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert model == cards[0]["id"] and all(c.get("root") == model for c in cards[1:])  # the base model's card
    jobs = [Job("ignored", [{"role": "user", "content": f"Say something about {i}"}]) for i in range(3)]
    request = functools.partial(serving._openai_request, model=model)
    stats = asyncio.run(closed_loop(url, jobs, 1, 4, request))
    assert stats["requests"] == 3 and stats["failed"] == 0 and stats["decode_tok_s_per_request"] > 0


def test_the_benchmark_mixes_both_kinds_from_files_in_the_project():
    from prompt_store import format as psf

    sets = {name: psf.parse(data) for name, data in serving.bench_prompt_sets("f" * 16).items()}
    assert {name: ps.kind for name, ps in sets.items()} == \
        {"bench-chat": "input", "bench-ner": "deep", "bench-spam": "deep"}
    assert all(ps.meta.task_type == "generate" and not any(k.startswith("head.") for k in ps.tensors)
               for ps in sets.values())
    assert psf.load(serving.BENCH_SETS["chat"]).tensors["embeddings"].ndim == 2  # the inputs_embeds baseline's


def test_busy_neighbours_keep_cores_busy_and_stop_with_the_block():
    """N processes spinning on the CPU while the block runs, gone after it (each also ends by itself)."""
    import subprocess
    import time
    from pathlib import Path

    from benchmarks import serving

    started = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        return proc
    serving.subprocess.Popen = spy
    try:
        with serving.busy_neighbours(2, seconds=30):
            time.sleep(0.5)
            ticks = [int(Path(f"/proc/{p.pid}/stat").read_text().split()[13]) for p in started]
    finally:
        serving.subprocess.Popen = real_popen
    assert len(started) == 2 and all(t > 0 for t in ticks)  # they ran on the CPU (user time in clock ticks)
    assert all(p.poll() is not None for p in started)
