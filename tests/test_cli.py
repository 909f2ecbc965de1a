"""Failures a user can cause on the command line: one clear line on stderr, a non-zero status, no traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,says", [
    (["eval", "--demo", "spam", "--url", "http://127.0.0.1:9"], "cannot reach the server"),
    (["train", "--data", "/no/such/file.jsonl", "--task-type", "generate", "--out", "x.safetensors"],
     "/no/such/file.jsonl"),
    (["import-peft", "/no/such/adapter", "--out", "x.safetensors"], "adapter_config.json"),
    (["bench", "--bare", "--neighbours", "2"], "--neighbours measures something else"),
    (["bench", "--bare", "--rate", "1"], "--rate measures something else"),
])
def test_user_errors_are_one_line(args, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "app.cli", "--log-level", "error", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("promptserve")]
    assert len(lines) == 1, r.stderr[-2000:]


def test_a_kv_cache_budget_below_one_full_context_stops_the_server_with_one_line(tiny_model_dir, tmp_path):
    import os
    env = {**os.environ, "PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_KV_CACHE_MB": "1",
           "PROMPTSERVE_MAX_MODEL_LEN": "2048", "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(tmp_path / "store")}
    r = subprocess.run([sys.executable, "-m", "app.cli", "--log-level", "error", "serve", "--port", "9"],
                       cwd=os.getcwd(), capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "PROMPTSERVE_KV_CACHE_MB" in r.stderr and "cannot hold one sequence" in r.stderr, r.stderr[-2000:]
