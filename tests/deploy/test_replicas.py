"""Two server processes on one store directory: an upload to one is served by the other within 2 s."""

import time

import httpx

from tests.helpers import input_prompt_set
from tests.servers import free_port, spawn, stop, wait_ready


def _start(model_dir, store, port):
    env = {"PROMPTSERVE_MODEL": str(model_dir), "PROMPTSERVE_STORE_DIR": str(store), "PROMPTSERVE_ADMIN_TOKEN": "tok",
           "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": ""}
    return spawn(env, port)


def test_upload_to_one_replica_is_served_by_the_other(tiny_model_dir, tiny, tmp_path):
    store = tmp_path / "store"
    ports = [free_port(), free_port()]
    procs = [_start(tiny_model_dir, store, p) for p in ports]
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        for base, proc in zip((a, b), procs):
            wait_ready(base, proc)
        assert httpx.post(f"{b}/v1/tasks/shared", json={"prompt": "hi"}).status_code == 404
        for version in (1, 2):
            data = input_prompt_set(tiny.spec, 3, seed=version).to_bytes(tiny.spec)
            up = httpx.put(f"{a}/admin/prompt-sets/shared", content=data, headers={"Authorization": "Bearer tok"})
            assert up.status_code == 201 and up.json()["version"] == version
            answered = time.monotonic()
            while True:
                r = httpx.post(f"{b}/v1/tasks/shared", json={"prompt": "hi", "max_tokens": 2})
                if r.status_code == 200 and r.json()["prompt_set"]["version"] == version:
                    break
                assert time.monotonic() - answered < 2.0, f"replica b did not serve v{version} within 2 s"
                time.sleep(0.05)
    finally:
        for proc in procs:
            stop(proc)
