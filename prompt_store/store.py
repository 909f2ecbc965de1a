"""A directory of prompt sets: versions per task name, one active version per task.

Layout::

    <root>/tasks/<task>/v000001.safetensors   immutable once written
    <root>/tasks/<task>/ACTIVE                the active version number (the task exists while it does)
    <root>/tasks/<task>/LAST                  the highest version number ever issued (never goes down)
    <root>/tasks/<task>/keys/<hash>           idempotency keys of uploads: "<sha256> <version|pending>"
    <root>/locks/<task>.lock                  flock()ed by every write to the task

Identity. A version number is issued once in a task's lifetime: LAST is written before the version file
and survives a task delete, so delete + re-create can never hand out v1 again and a cache or a replica
that still holds "v1" cannot mistake new bytes for old. Readers identify content by sha256 anyway.

Transactions. Every write to a task (upload, activate, delete) holds the task's lock file, so writes
are serialized within a process (flock conflicts between two open() calls) and across processes that
share the directory. Each write is atomic (temp file, fsync, link/rename, fsync of the directory): a
crash at any point leaves the last good state, and start-up (recover()) removes what a killed writer
left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prompt_store import format as psf

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_FILE = re.compile(r"^v(\d{6,})\.safetensors$")
MAX_VERSION = 10**9 - 1  # version numbers above this are refused before they reach a file name


class StoreError(Exception):
    """A store operation that cannot be done as asked (the message says why)."""


class TaskNotFound(StoreError):
    pass


class VersionNotFound(StoreError):
    pass


class ActiveVersion(StoreError):
    """The operation would leave the task without an active version."""


class IdempotencyConflict(StoreError):
    """An idempotency key reused with other bytes."""


@dataclass(frozen=True)
class VersionInfo:
    task: str
    version: int
    path: Path
    meta: psf.PromptSetMeta
    size: int
    sha256: str
    created: float
    active: bool = False
    created_now: bool = True  # False when an upload returned a version that was already stored


def validate_task_name(task: str) -> str:
    if not isinstance(task, str) or not TASK_NAME.match(task) or ".." in task:
        raise StoreError(
            f"invalid task name {task!r}: 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit")
    return task


def validate_version(task: str, version: int) -> int:
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise VersionNotFound(f"task {task!r} has no version {version}")
    return version


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version_file(d: Path, version: int) -> Path:
    return d / f"v{version:06d}.safetensors"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = _write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class PromptStore:
    # Test hook: called with a step name between the file operations of a write, so a test can simulate
    # a crash (raise) at any point and check what a restarted store then shows.
    crash_point = staticmethod(lambda step: None)
    UPLOAD_CRASH_POINTS = ("claimed", "written", "linked")

    def __init__(self, root: str | Path, recover: bool = True):
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.locks_dir = self.root / "locks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        self._info_cache: dict[tuple, VersionInfo] = {}
        self._cache_lock = threading.Lock()
        if recover:
            self.recover()

    # -- locking ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, task: str) -> Iterator[Path]:
        """The task's write lock, for this thread against every other thread and process on the store."""
        validate_task_name(task)
        fd = os.open(self.locks_dir / f"{task}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.tasks_dir / task
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def recover(self) -> None:
        """Remove what killed writers left: temp files, and the directories of an older task delete.
        Under each task's lock, so a writer of another process that is alive is never disturbed."""
        for leftover in self.root.glob(".deleted-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for d in self.tasks_dir.iterdir():
            if not (d.is_dir() and TASK_NAME.match(d.name)):
                continue
            with self._locked(d.name):
                for tmp in list(d.glob(".tmp-*")) + list(d.glob("keys/.tmp-*")):
                    tmp.unlink(missing_ok=True)
                if not (d / "ACTIVE").is_file():  # a task delete (or a first upload) that was cut short
                    self._remove_contents(d)

    # -- reading ---------------------------------------------------------------------------------
    def _task_dir(self, task: str) -> Path:
        return self.tasks_dir / validate_task_name(task)

    def _version_path(self, task: str, version: int) -> Path:
        return _version_file(self._task_dir(task), validate_version(task, version))

    def active_version(self, task: str) -> int:
        try:
            text = (self._task_dir(task) / "ACTIVE").read_text().strip()
            return int(text)
        except (FileNotFoundError, NotADirectoryError):
            raise TaskNotFound(f"no task named {task!r}") from None
        except ValueError:
            raise StoreError(f"task {task!r} has an unreadable ACTIVE pointer") from None

    def exists(self, task: str) -> bool:
        return (self._task_dir(task) / "ACTIVE").is_file()

    def _stored_versions(self, d: Path) -> list[int]:
        try:
            found = (_VERSION_FILE.match(p.name) for p in d.iterdir())
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in found if m)

    def versions(self, task: str) -> list[int]:
        d = self._task_dir(task)
        if not (d / "ACTIVE").is_file():
            raise TaskNotFound(f"no task named {task!r}")
        return self._stored_versions(d)

    def tasks(self) -> list[str]:
        return [d.name for d in sorted(self.tasks_dir.iterdir())
                if TASK_NAME.match(d.name) and (d / "ACTIVE").is_file()]

    def info(self, task: str, version: int, active: bool | None = None) -> VersionInfo:
        path = self._version_path(task, version)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise VersionNotFound(f"task {task!r} has no version {version}") from None
        # Keyed by the file's identity, not only its name: a cached hash is never one of other bytes.
        key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
        info = self._info_cache.get(key)
        if info is None:
            data = path.read_bytes()
            meta = psf.PromptSetMeta.from_header(psf.header_of(data))
            info = VersionInfo(task, version, path, meta, st.st_size, sha256_of(data), st.st_mtime)
            with self._cache_lock:
                self._info_cache[key] = info
        if active is None:
            active = self.active_version(task) == version
        return VersionInfo(**{**info.__dict__, "active": active, "created_now": False})

    def resolve(self, task: str) -> VersionInfo:
        """The active version of a task (read from disk each time, so other processes' writes show)."""
        for _ in range(3):
            version = self.active_version(task)
            try:
                return self.info(task, version, active=True)
            except VersionNotFound:
                continue  # ACTIVE moved on and its old version was deleted between the two reads
        raise TaskNotFound(f"no task named {task!r}")

    def list_versions(self, task: str) -> list[VersionInfo]:
        active = self.active_version(task)
        out = []
        for v in self.versions(task):
            try:
                out.append(self.info(task, v, active=(v == active)))
            except VersionNotFound:
                continue  # deleted meanwhile
        return out

    def _find_sha(self, task: str, sha: str) -> int | None:
        """The newest stored version of the task with these bytes."""
        return next((v for v in reversed(self._stored_versions(self._task_dir(task)))
                     if self._has_sha(task, v, sha)), None)

    def _has_sha(self, task: str, version: int, sha: str) -> bool:
        try:
            return self.info(task, version, active=False).sha256 == sha
        except VersionNotFound:  # deleted meanwhile
            return False

    # -- writing (each under the task's lock) ----------------------------------------------------
    def put(self, task: str, data: bytes, activate: bool = True, idempotency_key: str | None = None
            ) -> VersionInfo:
        """Store already-validated prompt-set bytes as the task's next version (and activate it).

        Idempotent: with an idempotency key that was used before with the same bytes, or with the same
        bytes as the task's newest version, the stored version is returned (activated if asked) instead
        of a duplicate; `created_now` says which. A key used before with other bytes is refused."""
        sha = sha256_of(data)
        with self._locked(task) as d:
            d.mkdir(parents=True, exist_ok=True)
            if not (d / "ACTIVE").is_file():  # a new task, or one whose delete (or first upload) was cut
                if not activate:
                    raise TaskNotFound(f"no task named {task!r}: its first version must be activated")
                self._remove_contents(d)
            key_path = self._key_path(d, idempotency_key) if idempotency_key else None
            if key_path is not None:
                key_path.parent.mkdir(exist_ok=True)
            key_known = key_path is not None and key_path.is_file()
            if key_known:
                recorded_sha, _ = key_path.read_text().split()
                if recorded_sha != sha:
                    raise IdempotencyConflict(
                        f"idempotency key {idempotency_key!r} was used for other bytes (sha256 {recorded_sha})")
            reuse = self._find_sha(task, sha) if key_known else None
            stored = self._stored_versions(d)
            if reuse is None and stored and self._has_sha(task, stored[-1], sha):
                reuse = stored[-1]  # the same bytes uploaded again in a row
            if reuse is not None:
                if activate:
                    self._write_active(d, reuse)
                if key_path is not None:
                    _replace_atomically(key_path, f"{sha} {reuse}\n".encode())
                return self.info(task, reuse)  # under the lock: the state this upload left
            if key_path is not None:  # recorded first: a retry after a crash below finds the bytes by hash
                _replace_atomically(key_path, f"{sha} pending\n".encode())
            version = self._claim_version(d)
            self.crash_point("claimed")
            tmp = _write_temp(d, data)
            try:
                self.crash_point("written")
                os.link(tmp, self._version_path(task, version))
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(d)
            self.crash_point("linked")
            if activate:
                self._write_active(d, version)
            if key_path is not None:
                _replace_atomically(key_path, f"{sha} {version}\n".encode())
            info = self.info(task, version)  # under the lock: the state this upload left
        return VersionInfo(**{**info.__dict__, "created_now": True})

    def _must_exist(self, task: str) -> None:
        """A write to a task that does not exist is refused before its lock file is made (checked again
        under the lock): a request naming a missing task leaves nothing behind."""
        if not (self._task_dir(task) / "ACTIVE").is_file():
            raise TaskNotFound(f"no task named {task!r}")

    def activate(self, task: str, version: int) -> VersionInfo:
        validate_version(task, version)
        self._must_exist(task)
        with self._locked(task) as d:
            if not (d / "ACTIVE").is_file():
                raise TaskNotFound(f"no task named {task!r}")
            if not self._version_path(task, version).is_file():
                raise VersionNotFound(f"task {task!r} has no version {version}")
            self._write_active(d, version)
            return self.info(task, version, active=True)

    def delete_version(self, task: str, version: int) -> None:
        validate_version(task, version)
        self._must_exist(task)
        with self._locked(task):
            if self.active_version(task) == version:
                raise ActiveVersion(
                    f"version {version} is the active version of {task!r}: activate another version "
                    "first, or delete the whole task")
            path = self._version_path(task, version)
            try:
                path.unlink()
            except FileNotFoundError:
                raise VersionNotFound(f"task {task!r} has no version {version}") from None
            _fsync_dir(path.parent)

    def delete_task(self, task: str) -> None:
        """The task disappears at once (its ACTIVE pointer goes first); its versions and keys are then
        removed. LAST stays: a task of the same name created later continues the numbering."""
        self._must_exist(task)
        with self._locked(task) as d:
            active = d / "ACTIVE"
            if not active.is_file():
                raise TaskNotFound(f"no task named {task!r}")
            active.unlink()
            _fsync_dir(d)
            self.crash_point("deactivated")
            self._remove_contents(d)

    def _remove_contents(self, d: Path) -> None:
        """A task's versions and keys, keeping LAST (under the task's lock)."""
        versions = self._stored_versions(d)
        self._write_last(d, self._highest_issued(d, versions))
        for v in versions:
            _version_file(d, v).unlink(missing_ok=True)
        shutil.rmtree(d / "keys", ignore_errors=True)
        _fsync_dir(d)

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _key_path(d: Path, key: str) -> Path:
        return d / "keys" / sha256_of(key.encode("utf-8", "surrogatepass"))[:32]

    @staticmethod
    def _last(d: Path) -> int:
        try:
            return int((d / "LAST").read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0

    def _highest_issued(self, d: Path, stored: list[int]) -> int:
        """LAST, or a stored version above it (a store written before LAST existed)."""
        return max([self._last(d), *stored])

    @staticmethod
    def _write_last(d: Path, version: int) -> None:
        _replace_atomically(d / "LAST", f"{version}\n".encode())

    def _claim_version(self, d: Path) -> int:
        """The next number, persisted before it is used: a crash after this skips a number, never reuses one."""
        version = self._highest_issued(d, self._stored_versions(d)) + 1
        if version > MAX_VERSION:
            raise StoreError(f"task {d.name!r} has used up its version numbers")
        self._write_last(d, version)
        return version

    def _write_active(self, d: Path, version: int) -> None:
        _replace_atomically(d / "ACTIVE", f"{version}\n".encode())
