"""Records and blobs beside the prompt sets: the fine-tuning API's files, jobs and checkpoints.

Two kinds of object, on the same backend as the prompt-set store (the directory, or the S3 bucket), so every
replica and every training worker sees the same ones:

  blob    immutable bytes under a key (an uploaded JSONL, a training checkpoint): put, get, delete, list
  record  a small JSON document that changes, only by compare-and-swap: read() gives (doc, tag), swap(key,
          doc, tag) writes it only if nobody wrote since that read, else RecordConflict; create() only if
          absent. `update(key, change)` is the read-change-swap loop every writer uses, so two API replicas
          and two workers changing one job never lose each other's changes, and two workers never both take
          a job (the claim is a swap).

The directory backend swaps under an flock()ed lock file per record (processes sharing the directory); the
object backend with `If-Match: <etag>` / `If-None-Match: *` (as the prompt-set manifests do).

Keys are '/'-separated words of [A-Za-z0-9_.-]: `files/file-abc`, `jobs/ftjob-abc/checkpoints/step-40`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Protocol

from prompt_store.store import _fsync_dir, _replace_atomically

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}){0,7}$")
SWAP_ATTEMPTS = 50


class RecordConflict(Exception):
    """Somebody else wrote the record since it was read (or created it first)."""


class RecordNotFound(KeyError):
    pass


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid record key {key!r}")
    return key


class RecordStore(Protocol):
    def put_blob(self, key: str, data: bytes) -> None: ...
    def get_blob(self, key: str) -> bytes: ...
    def delete_blob(self, key: str) -> None: ...
    def blobs(self, prefix: str) -> list[str]: ...
    def read(self, key: str) -> tuple[dict, str]: ...
    def create(self, key: str, doc: dict) -> None: ...
    def swap(self, key: str, doc: dict, tag: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def records(self, prefix: str) -> list[str]: ...


def update(store: RecordStore, key: str, change: Callable[[dict], dict | None]) -> dict:
    """Read, change(copy of the doc) -> the new doc (None: leave it as it is), swap; again on a conflict.
    change may raise to refuse the update (nothing is written). Returns the doc as stored after."""
    for _ in range(SWAP_ATTEMPTS):
        doc, tag = store.read(key)
        new = change(copy.deepcopy(doc))
        if new is None:
            return doc
        try:
            store.swap(key, new, tag)
            return new
        except RecordConflict:
            continue
    raise RecordConflict(f"record {key!r} kept changing under this update")


class FileRecordStore:
    """Under <root>/fine_tuning/: blobs/<key>, records/<key>.json ({"tag": n, "doc": ...}), locks/."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "fine_tuning"
        for part in ("blobs", "records", "locks"):
            (self.root / part).mkdir(parents=True, exist_ok=True)

    # -- blobs -------------------------------------------------------------------------------------
    def _blob(self, key: str) -> Path:
        return self.root / "blobs" / check_key(key)

    def put_blob(self, key: str, data: bytes) -> None:
        path = self._blob(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(path, data)

    def get_blob(self, key: str) -> bytes:
        try:
            return self._blob(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise RecordNotFound(key) from None

    def delete_blob(self, key: str) -> None:
        self._blob(key).unlink(missing_ok=True)

    def blobs(self, prefix: str) -> list[str]:
        return self._under(self.root / "blobs", prefix, "")

    # -- records -----------------------------------------------------------------------------------
    def _record(self, key: str) -> Path:
        return self.root / "records" / f"{check_key(key)}.json"

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        path = self._record(key)
        fd = os.open(self.root / "locks" / (key.replace("/", "__") + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            os.close(fd)

    @staticmethod
    def _load(path: Path) -> tuple[dict, str]:
        try:
            stored = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise RecordNotFound(str(path)) from None
        return stored["doc"], str(stored["tag"])

    def read(self, key: str) -> tuple[dict, str]:
        try:
            return self._load(self._record(key))
        except RecordNotFound:
            raise RecordNotFound(key) from None

    def _write(self, path: Path, doc: dict, tag: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_atomically(path, json.dumps({"tag": tag, "doc": doc}).encode())

    def create(self, key: str, doc: dict) -> None:
        with self._locked(key) as path:
            if path.exists():
                raise RecordConflict(f"record {key!r} exists")
            self._write(path, doc, 1)

    def swap(self, key: str, doc: dict, tag: str) -> None:
        with self._locked(key) as path:
            try:
                _, current = self._load(path)
            except RecordNotFound:
                raise RecordNotFound(key) from None
            if current != tag:
                raise RecordConflict(f"record {key!r} changed since it was read")
            self._write(path, doc, int(tag) + 1)

    def delete(self, key: str) -> None:
        with self._locked(key) as path:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    def records(self, prefix: str) -> list[str]:
        return self._under(self.root / "records", prefix, ".json")

    @staticmethod
    def _under(base: Path, prefix: str, suffix: str) -> list[str]:
        """Keys of the files directly in the folder `prefix` names (not deeper)."""
        folder = base / check_key(prefix.rstrip("/"))
        try:
            names = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".tmp-")]
        except FileNotFoundError:
            return []
        return sorted(f"{prefix.rstrip('/')}/{n[:len(n) - len(suffix)] if suffix else n}"
                      for n in names if n.endswith(suffix))


class ObjectRecordStore:
    """Under <prefix>fine_tuning/ in the bucket: blobs/<key>, records/<key>.json; swaps by ETag."""

    def __init__(self, client, bucket: str, prefix: str):
        self._s3, self.bucket, self.prefix = client, bucket, f"{prefix}fine_tuning/"

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        from prompt_store.object_store import StoreUnavailable

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise RecordNotFound(kwargs.get("Key", "")) from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise RecordConflict(f"{kwargs.get('Key')} changed since it was read") from None
            if status >= 500:
                raise StoreUnavailable(f"the object store failed: {exc}") from None
            raise
        except BotoCoreError as exc:
            raise StoreUnavailable(f"the object store cannot be reached: {exc}") from None

    def _blob(self, key: str) -> str:
        return f"{self.prefix}blobs/{check_key(key)}"

    def _record(self, key: str) -> str:
        return f"{self.prefix}records/{check_key(key)}.json"

    def put_blob(self, key: str, data: bytes) -> None:
        self._call(self._s3.put_object, Key=self._blob(key), Body=data)

    def get_blob(self, key: str) -> bytes:
        return self._call(self._s3.get_object, Key=self._blob(key))["Body"].read()

    def delete_blob(self, key: str) -> None:
        self._call(self._s3.delete_object, Key=self._blob(key))

    def blobs(self, prefix: str) -> list[str]:
        return self._list(f"{self.prefix}blobs/", prefix, "")

    def read(self, key: str) -> tuple[dict, str]:
        r = self._call(self._s3.get_object, Key=self._record(key))
        return json.loads(r["Body"].read()), r["ETag"]

    def create(self, key: str, doc: dict) -> None:
        self._call(self._s3.put_object, Key=self._record(key), Body=json.dumps(doc).encode(),
                   ContentType="application/json", IfNoneMatch="*")

    def swap(self, key: str, doc: dict, tag: str) -> None:
        self._call(self._s3.put_object, Key=self._record(key), Body=json.dumps(doc).encode(),
                   ContentType="application/json", IfMatch=tag)

    def delete(self, key: str) -> None:
        self._call(self._s3.delete_object, Key=self._record(key))

    def records(self, prefix: str) -> list[str]:
        return self._list(f"{self.prefix}records/", prefix, ".json")

    def _list(self, base: str, prefix: str, suffix: str) -> list[str]:
        folder = check_key(prefix.rstrip("/")) + "/"
        keys = []
        token = None
        while True:
            kwargs = {"Prefix": base + folder, "Delimiter": "/", **({"ContinuationToken": token} if token else {})}
            page = self._call(self._s3.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                name = obj["Key"][len(base):]
                if name.endswith(suffix):
                    keys.append(name[:len(name) - len(suffix)] if suffix else name)
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]
