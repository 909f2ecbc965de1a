"""Seeding the prompt-set store with the shipped demo sets, and moving it on to newer releases of them.

A task the store lacks gets the shipped file as its first version. A task the store has keeps what it
serves, with one exception: when its active version is byte for byte an earlier shipped release of that
demo set (content hashes in releases.json beside the sets), the new release goes in as its next version,
so a store seeded by an older promptserve serves the better set after an upgrade. Never replaced: a
version an admin uploaded, and a store that already holds the new release in any version (an admin who
went back to the old one after the upgrade has chosen). The earlier version stays, to re-activate."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prompt_store import PromptStore
from prompt_store.store import sha256_of

log = logging.getLogger("promptserve")

RELEASES_FILE = "releases.json"


def earlier_releases(seed_dir: Path) -> dict[str, set[str]]:
    """task -> the sha256 of every earlier shipped release of its demo set."""
    path = seed_dir / RELEASES_FILE
    if not path.is_file():
        return {}
    return {task: set(entry.get("earlier_sha256", [])) for task, entry in json.loads(path.read_text()).items()}


def seed_store(store: PromptStore, service, seed_dir: str | Path | None) -> None:
    """Import shipped prompt sets whose task is not in the store, or whose active version is an earlier
    shipped release. service: the TaskService (it validates against the model and preloads)."""
    if not seed_dir or not Path(seed_dir).is_dir():
        return
    seed_dir = Path(seed_dir)
    earlier = earlier_releases(seed_dir)
    existing = set(store.tasks())
    for path in sorted(seed_dir.glob("*.safetensors")):
        task, data = path.stem, path.read_bytes()
        try:
            if task in existing and not _is_outdated_release(store, task, sha256_of(data), earlier.get(task, set())):
                continue
            info = service.upload(task, data)
            log.info("seeded task %s v%d from %s", info.task, info.version, path)
        except Exception as exc:  # e.g. trained for another base model: skip it, say why
            log.warning("not seeding %s: %s", path, exc)


def _is_outdated_release(store: PromptStore, task: str, shipped_sha: str, earlier: set[str]) -> bool:
    """The active version is an earlier shipped release and no version is this one. The active version
    alone decides the common case (an object store fetches a version to describe it): only a store still
    on an earlier release has its versions listed, to find whether an admin went back from this one."""
    if store.resolve(task).sha256 not in earlier:
        return False  # this release, or an admin's upload
    return all(v.sha256 != shipped_sha for v in store.list_versions(task))
