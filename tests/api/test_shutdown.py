"""SIGTERM drains: in-flight requests complete, new ones get 503, the process exits within the grace."""

import signal
import threading
import time

import httpx

from tests.servers import free_port, spawn, wait_ready


def test_sigterm_drains_then_exits(tiny_model_dir, tiny, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_STORE_DIR": str(tmp_path / "s"),
           "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_MAX_MODEL_LEN": "4096", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_DRAIN_GRACE": "20"}
    proc = spawn(env, port)
    try:
        wait_ready(base, proc)
        result = {}

        def long_request():  # 1000 tokens: still running when SIGTERM arrives
            r = httpx.post(f"{base}/v1/tasks/{tiny.spec.name}", timeout=60,
                           json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True})
            result["status"], result["tokens"] = r.status_code, r.json()["usage"]["completion_tokens"]

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = httpx.post(f"{base}/v1/tasks/{tiny.spec.name}", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.headers.get("retry-after")
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 503
        t.join(30)
        assert result == {"status": 200, "tokens": 1000}
        start = time.time()
        proc.wait(20)
        assert time.time() - start < 20
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_past_its_grace_cuts_streams_with_an_error_then_done_and_exits_0_in_time(tmp_path):
    # the embedded model: 2,000 tokens take far longer than the grace (the tiny one finishes first)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    grace = 4.0
    env = {"PROMPTSERVE_STORE_DIR": str(tmp_path / "s"), "PROMPTSERVE_SEED_DIR": "", "PROMPTSERVE_WARMUP": "0",
           "PROMPTSERVE_DRAIN_GRACE": str(grace)}
    proc = spawn(env, port)
    try:
        wait_ready(base, proc)
        # an OpenAI stream and a task-endpoint stream: both end with an error event, then [DONE]
        routes = {"openai": ("/v1/completions", {"model": "SmolLM2-135M-Instruct"}),
                  "task": ("/v1/tasks/SmolLM2-135M-Instruct", {})}
        streams: dict[str, list[str]] = {name: [] for name in routes}

        def endless_stream(name):  # far longer than the grace period
            path, extra = routes[name]
            with httpx.stream("POST", f"{base}{path}", timeout=60,
                              json={**extra, "prompt": "x", "max_tokens": 2000, "ignore_eos": True,
                                    "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streams[name].append(line[6:])

        threads = [threading.Thread(target=endless_stream, args=(name,)) for name in routes]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not all(streams.values()) and time.time() < deadline:
            time.sleep(0.05)
        assert all(streams.values()), "the streams never started"
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(grace + 5)
        took = time.time() - start
        for t in threads:
            t.join(10)
        assert code == 0
        assert took < grace + 1.0, took
        for name, events in streams.items():
            assert events[-1] == "[DONE]" and '"error"' in events[-2] and "shutting down" in events[-2], \
                (name, events[-3:])
    finally:
        if proc.poll() is None:
            proc.kill()
