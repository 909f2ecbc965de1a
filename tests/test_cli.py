"""Failures a user can cause on the command line: one clear line on stderr, a non-zero status, no traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,says", [
    (["eval", "--demo", "spam", "--url", "http://127.0.0.1:9"], "cannot reach the server"),
    (["train", "--data", "/no/such/file.jsonl", "--task-type", "generate", "--out", "x.safetensors"],
     "/no/such/file.jsonl"),
    (["import-peft", "/no/such/adapter", "--out", "x.safetensors"], "adapter_config.json"),
])
def test_user_errors_are_one_line(args, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "app.cli", "--log-level", "error", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("promptserve")]
    assert len(lines) == 1, r.stderr[-2000:]
