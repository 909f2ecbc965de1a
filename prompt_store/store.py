"""A directory of prompt sets: versions per task name, one active version per task.

Layout::

    <root>/tasks/<task>/v000001.safetensors   immutable once written
    <root>/tasks/<task>/ACTIVE                the active version number

Every write is atomic (temp file, fsync, then link/rename, then fsync of the directory), so a crash at
any moment leaves the last good state: a version file is either absent or complete, and ACTIVE always
names a complete version. Versions are claimed with ``os.link``, which fails if the name exists, so
several server processes can share one store directory without overwriting each other's uploads.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from prompt_store import format as psf

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_FILE = re.compile(r"^v(\d{6,})\.safetensors$")


class StoreError(Exception):
    """A store operation that cannot be done as asked (the message says why)."""


class TaskNotFound(StoreError):
    pass


class VersionNotFound(StoreError):
    pass


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


def validate_task_name(task: str) -> str:
    if not TASK_NAME.match(task or "") or ".." in task:
        raise StoreError(
            f"invalid task name {task!r}: 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit")
    return task


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


class PromptStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self._info_cache: dict[Path, tuple[float, VersionInfo]] = {}
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------
    def _task_dir(self, task: str) -> Path:
        return self.tasks_dir / validate_task_name(task)

    def _version_path(self, task: str, version: int) -> Path:
        return self._task_dir(task) / f"v{version:06d}.safetensors"

    def active_version(self, task: str) -> int:
        try:
            text = (self._task_dir(task) / "ACTIVE").read_text().strip()
            return int(text)
        except (FileNotFoundError, NotADirectoryError):
            raise TaskNotFound(f"no task named {task!r}") from None
        except ValueError:
            raise StoreError(f"task {task!r} has an unreadable ACTIVE pointer") from None

    def versions(self, task: str) -> list[int]:
        d = self._task_dir(task)
        if not d.is_dir():
            raise TaskNotFound(f"no task named {task!r}")
        found = (_VERSION_FILE.match(p.name) for p in d.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def tasks(self) -> list[str]:
        names = []
        for d in sorted(self.tasks_dir.iterdir()):
            if d.is_dir() and (d / "ACTIVE").is_file() and TASK_NAME.match(d.name):
                names.append(d.name)
        return names

    def info(self, task: str, version: int, active: bool | None = None) -> VersionInfo:
        path = self._version_path(task, version)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise VersionNotFound(f"task {task!r} has no version {version}") from None
        cached = self._info_cache.get(path)
        if cached is None or cached[0] != st.st_mtime:
            # Versions are immutable, so header and hash are read once per file.
            meta = psf.read_meta(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            cached = (st.st_mtime, VersionInfo(task, version, path, meta, st.st_size, digest, st.st_mtime))
            with self._lock:
                self._info_cache[path] = cached
        info = cached[1]
        if active is None:
            active = self.active_version(task) == version
        return VersionInfo(**{**info.__dict__, "active": active})

    def resolve(self, task: str) -> VersionInfo:
        """The active version of a task (read from disk each time, so other processes' writes show)."""
        version = self.active_version(task)
        return self.info(task, version, active=True)

    def list_versions(self, task: str) -> list[VersionInfo]:
        active = self.active_version(task)
        return [self.info(task, v, active=(v == active)) for v in self.versions(task)]

    # -- writing ---------------------------------------------------------------------------------
    def put(self, task: str, data: bytes, activate: bool = True) -> VersionInfo:
        """Store already-validated prompt-set bytes as the task's next version."""
        d = self._task_dir(task)
        d.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(d, data)
        try:
            version = max(self.versions(task), default=0) + 1
            while True:
                try:
                    os.link(tmp, self._version_path(task, version))  # fails if another writer took it
                    break
                except FileExistsError:
                    version += 1
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(d)
        if activate:
            self.activate(task, version)
        return self.info(task, version)

    def activate(self, task: str, version: int) -> VersionInfo:
        d = self._task_dir(task)
        if not self._version_path(task, version).is_file():
            if not d.is_dir():
                raise TaskNotFound(f"no task named {task!r}")
            raise VersionNotFound(f"task {task!r} has no version {version}")
        tmp = _write_temp(d, f"{version}\n".encode())
        os.replace(tmp, d / "ACTIVE")
        _fsync_dir(d)
        return self.info(task, version, active=True)

    def delete_version(self, task: str, version: int) -> None:
        if self.active_version(task) == version:
            raise StoreError(
                f"version {version} is the active version of {task!r}: activate another version "
                "first, or delete the whole task")
        path = self._version_path(task, version)
        try:
            path.unlink()
        except FileNotFoundError:
            raise VersionNotFound(f"task {task!r} has no version {version}") from None
        _fsync_dir(path.parent)

    def delete_task(self, task: str) -> None:
        d = self._task_dir(task)
        if not d.is_dir():
            raise TaskNotFound(f"no task named {task!r}")
        # Rename first so the task disappears atomically for readers, then remove the files.
        graveyard = self.root / f".deleted-{task}-{os.getpid()}-{threading.get_ident()}"
        os.replace(d, graveyard)
        _fsync_dir(self.tasks_dir)
        shutil.rmtree(graveyard, ignore_errors=True)
