"""The prompt-set store on S3-compatible object storage, for replicas on several hosts.

Selected by `PROMPTSERVE_STORE_URL=s3://bucket/prefix`; the endpoint and credentials come from the standard
AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) through boto3: the
reference client, already a dependency of the test tooling, and the one every S3-compatible server is
tested against (obstore is faster for bulk transfers, which a store of kilobyte-to-megabyte files does not
need).

Layout under the prefix, per task:
  tasks/<task>/versions/<sha256>.safetensors   immutable, named by content: written once, never changed
  tasks/<task>/manifest.json                   {"last", "active", "versions": {n: {sha256, size, created}},
                                                "keys": {key hash: [sha256, version]}, "deleted",
                                                "generation": swaps so far}
Version objects are never deleted: a deleted version or task leaves the manifest and is never served again,
but its bytes stay (a concurrent upload of the same bytes may name the same object; removing it could lose
an acknowledged version). A bucket lifecycle rule can reclaim the space.
The manifest is the only object that changes, and only by compare-and-swap: a write carries
`If-Match: <etag it read>` (or `If-None-Match: *` when creating) and is retried on 412, so two replicas
writing at once never lose an update and a version number is never issued twice -- also across a task
delete, which keeps the manifest as a tombstone with its `last`. No lock service is needed; a server that
ignored the conditions would lose that guarantee (SeaweedFS, MinIO and AWS S3 enforce them).

Reads go through a per-replica cache: a task's manifest is read again once it is older than the poll
interval (1 s by default), so a new active version is served by every replica within that, and version
files are downloaded once into a local directory (checked against their sha256) that the engine reads.
When the object store cannot be reached, reads keep serving the manifests and files already cached, and
writes raise StoreUnavailable (the API answers 503 with Retry-After) until it is back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prompt_store import format as psf
from prompt_store.store import (
    ActiveVersion,
    IdempotencyConflict,
    StoreError,
    TaskNotFound,
    VersionInfo,
    VersionNotFound,
    sha256_of,
    validate_task_name,
    validate_version,
)

CAS_ATTEMPTS = 20


class StoreUnavailable(Exception):
    """The object store cannot be reached (or kept failing): the operation may be retried later."""


@dataclass
class _Cached:
    manifest: dict | None  # None: no such task
    read_at: float


def _generation(manifest: dict | None) -> int:
    """How many swaps made this manifest (-1: none exists yet; manifests are never removed, a deleted task
    keeps a tombstone)."""
    return -1 if manifest is None else manifest.get("generation", 0)


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/") ("" without a prefix)."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}: use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class ObjectPromptStore:
    # Where a test may simulate a kill (see PromptStore.crash_point): before anything is written, and with
    # the version object written but the manifest not yet swapped. There is no third state: the manifest
    # swap stores and activates a version at once.
    UPLOAD_CRASH_POINTS = ("before_content", "content_written")
    crash_point = staticmethod(lambda step: None)

    def __init__(self, url: str, cache_dir: str | Path, poll_seconds: float = 1.0, client=None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = parse_s3_url(url)
        self.poll_seconds = poll_seconds
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # fail fast when the store is down: a request must not hang on it (reads fall back to the cache)
        self._s3 = client or boto3.client("s3", config=Config(
            connect_timeout=2, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}))
        self._errors = self._s3.exceptions
        self._manifests: dict[str, _Cached] = {}
        self._tasks: tuple[float, list[str]] | None = None
        self._lock = threading.Lock()
        self._meta: dict[str, psf.PromptSetMeta] = {}

    # -- objects -----------------------------------------------------------------------------------
    def _key(self, task: str, name: str) -> str:
        return f"{self.prefix}tasks/{task}/{name}"

    def _call(self, fn, *args, **kwargs):
        """An S3 call; a connection failure or server error becomes StoreUnavailable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500:
                raise StoreUnavailable(f"the object store failed: {exc}") from None
            raise
        except BotoCoreError as exc:  # connection refused, timeouts, DNS
            raise StoreUnavailable(f"the object store cannot be reached: {exc}") from None

    def _read_manifest(self, task: str) -> tuple[dict | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            r = self._call(self._s3.get_object, Bucket=self.bucket, Key=self._key(task, "manifest.json"))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise
        return json.loads(r["Body"].read()), r["ETag"]

    def _manifest(self, task: str) -> dict:
        """The task's manifest as this replica last read it, read again after the poll interval; the cached
        one (when there is one) while the object store is down."""
        validate_task_name(task)
        now = time.monotonic()
        cached = self._manifests.get(task)
        if cached is None or now - cached.read_at >= self.poll_seconds:
            try:
                manifest, _ = self._read_manifest(task)
                cached = self._remember(task, manifest, now)
            except StoreUnavailable:
                if cached is None:
                    raise
        if cached.manifest is None or cached.manifest.get("deleted") or cached.manifest.get("active") is None:
            raise TaskNotFound(f"no task named {task!r}")
        return cached.manifest

    def _remember(self, task: str, manifest: dict | None, read_at: float) -> _Cached:
        """Cache a manifest unless a newer one is cached already. Two threads of one replica can finish in
        either order (a read that began before a write, two writes whose swaps succeeded one after the
        other): without this, the older manifest could land last and be served for a poll interval, e.g. a
        task deleted and acknowledged still listed. Every swap raises `generation` by one."""
        with self._lock:
            cached = self._manifests.get(task)
            if cached is not None and _generation(cached.manifest) > _generation(manifest):
                return cached
            cached = _Cached(manifest, read_at)
            self._manifests[task] = cached
            return cached

    def _update(self, task: str, change) -> tuple[dict, object]:
        """Compare-and-swap the task's manifest: change(manifest or None) -> (new manifest, result)."""
        from botocore.exceptions import ClientError

        validate_task_name(task)
        for _ in range(CAS_ATTEMPTS):
            manifest, etag = self._read_manifest(task)
            new, result = change(copy.deepcopy(manifest))
            new["generation"] = _generation(manifest) + 1
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self._call(self._s3.put_object, Bucket=self.bucket, Key=self._key(task, "manifest.json"),
                           Body=json.dumps(new).encode(), ContentType="application/json", **condition)
            except ClientError as exc:
                if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict") or \
                        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                    continue  # another writer got there first: read again and redo the change
                raise
            self._remember(task, new, time.monotonic())
            with self._lock:
                self._tasks = None
            return new, result
        raise StoreUnavailable(f"task {task!r} kept changing under this write; retry it")

    def _local(self, task: str, sha: str) -> Path:
        """The version file in the local cache, downloaded (and checked) when missing."""
        path = self.cache_dir / f"{sha}.safetensors"
        if path.is_file():
            return path
        r = self._call(self._s3.get_object, Bucket=self.bucket, Key=self._key(task, f"versions/{sha}.safetensors"))
        data = r["Body"].read()
        if hashlib.sha256(data).hexdigest() != sha:
            raise StoreError(f"version object {sha} of {task!r} does not match its hash")
        tmp = path.with_suffix(f".tmp-{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path

    def _info(self, task: str, manifest: dict, version: int) -> VersionInfo:
        entry = manifest["versions"].get(str(version))
        if entry is None:
            raise VersionNotFound(f"task {task!r} has no version {version}")
        path = self._local(task, entry["sha256"])
        meta = self._meta.get(entry["sha256"])
        if meta is None:
            meta = psf.PromptSetMeta.from_header(psf.header_of(path.read_bytes()))
            self._meta[entry["sha256"]] = meta
        return VersionInfo(task, version, path, meta, entry["size"], entry["sha256"], entry["created"],
                           active=manifest.get("active") == version, created_now=False)

    # -- reading -------------------------------------------------------------------------------------
    def tasks(self) -> list[str]:
        from botocore.exceptions import ClientError

        with self._lock:
            if self._tasks is not None and time.monotonic() - self._tasks[0] < self.poll_seconds:
                return list(self._tasks[1])
        names = []
        try:
            paginator = self._s3.get_paginator("list_objects_v2")
            for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}tasks/",
                                                                   Delimiter="/"))):
                names += [p["Prefix"][len(self.prefix) + len("tasks/"):].rstrip("/")
                          for p in page.get("CommonPrefixes", [])]
        except (StoreUnavailable, ClientError):
            if self._tasks is not None:  # the store is down: the tasks this replica knew
                return list(self._tasks[1])
            known = sorted(t for t, c in self._manifests.items()
                           if c.manifest and not c.manifest.get("deleted") and c.manifest.get("active") is not None)
            if known:  # never listed yet, but these were read: serve them
                return known
            raise
        live = []
        for name in sorted(names):
            try:
                self._manifest(name)
                live.append(name)
            except (TaskNotFound, StoreError, ValueError):
                continue
        with self._lock:
            self._tasks = (time.monotonic(), live)
        return live

    def resolve(self, task: str) -> VersionInfo:
        manifest = self._manifest(task)
        return self._info(task, manifest, manifest["active"])

    def list_versions(self, task: str) -> list[VersionInfo]:
        manifest = self._manifest(task)
        return [self._info(task, manifest, int(v)) for v in sorted(manifest["versions"], key=int)]

    # -- writing -------------------------------------------------------------------------------------
    def put(self, task: str, data: bytes, activate: bool = True, idempotency_key: str | None = None
            ) -> VersionInfo:
        """The same contract as PromptStore.put: the next version (never a reused number), or the stored one
        for a repeated idempotency key or the same bytes as the newest version."""
        validate_task_name(task)
        sha = sha256_of(data)
        # the content first (immutable, by hash: a retry rewrites the same bytes), then the manifest
        self.crash_point("before_content")
        self._call(self._s3.put_object, Bucket=self.bucket, Key=self._key(task, f"versions/{sha}.safetensors"),
                   Body=data, ContentType="application/octet-stream")
        self.crash_point("content_written")
        key_id = hashlib.sha256(idempotency_key.encode()).hexdigest() if idempotency_key else None

        def change(manifest):
            if manifest is None or manifest.get("deleted") or manifest.get("active") is None:
                if not activate:
                    raise TaskNotFound(f"no task named {task!r}: its first version must be activated")
                manifest = {"last": (manifest or {}).get("last", 0), "active": None, "versions": {}, "keys": {}}
            versions = manifest["versions"]
            reuse = None
            if key_id and key_id in manifest["keys"]:
                recorded, version = manifest["keys"][key_id]
                if recorded != sha:
                    raise IdempotencyConflict(f"idempotency key {idempotency_key!r} was used for other bytes "
                                              f"(sha256 {recorded})")
                reuse = version if str(version) in versions else None
            newest = max(versions, key=int) if versions else None
            if reuse is None and newest is not None and versions[newest]["sha256"] == sha:
                reuse = int(newest)
            if reuse is None:
                reuse = manifest["last"] + 1
                validate_version(task, reuse)
                manifest["last"] = reuse
                versions[str(reuse)] = {"sha256": sha, "size": len(data), "created": time.time()}
                created = True
            else:
                created = False
            if activate:
                manifest["active"] = reuse
            if key_id:
                manifest["keys"][key_id] = [sha, reuse]
            return manifest, (reuse, created)

        manifest, (version, created) = self._update(task, change)
        info = self._info(task, manifest, version)
        return VersionInfo(**{**info.__dict__, "created_now": created})

    @staticmethod
    def _require_version(task: str, manifest: dict | None, version: int) -> dict:
        """The live manifest that holds this version, else TaskNotFound / VersionNotFound."""
        if manifest is None or manifest.get("deleted") or manifest.get("active") is None:
            raise TaskNotFound(f"no task named {task!r}")
        if str(version) not in manifest["versions"]:
            raise VersionNotFound(f"task {task!r} has no version {version}")
        return manifest

    def activate(self, task: str, version: int) -> VersionInfo:
        validate_version(task, version)

        def change(manifest):
            manifest = self._require_version(task, manifest, version)
            manifest["active"] = version
            return manifest, None

        manifest, _ = self._update(task, change)
        return self._info(task, manifest, version)

    def delete_version(self, task: str, version: int) -> None:
        validate_version(task, version)

        def change(manifest):
            manifest = self._require_version(task, manifest, version)
            if manifest["active"] == version:
                raise ActiveVersion(f"version {version} of {task!r} is active: activate another one first, "
                                    "or delete the task")
            del manifest["versions"][str(version)]
            return manifest, None

        self._update(task, change)

    def delete_task(self, task: str) -> None:
        def change(manifest):
            if manifest is None or manifest.get("deleted") or manifest.get("active") is None:
                raise TaskNotFound(f"no task named {task!r}")
            # a tombstone: the highest number issued survives, so a new task of this name continues it
            return {"last": manifest["last"], "active": None, "versions": {}, "keys": {}, "deleted": True}, None

        self._update(task, change)
        self.crash_point("deactivated")  # the swap was the whole delete: a kill now changes nothing
