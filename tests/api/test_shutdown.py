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
