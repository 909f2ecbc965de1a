"""The prompt-set file format and the versioned, crash-safe store of prompt sets."""

from prompt_store.format import PromptSet, PromptSetError, PromptSetMeta
from prompt_store.store import PromptStore, StoreError, TaskNotFound, VersionInfo


def _location(url: str, store_dir) -> tuple[str, str]:
    """("s3", url) or ("dir", path) of a store URL: s3://bucket/prefix, file:///path, or empty (store_dir)."""
    if url.startswith("s3://"):
        return "s3", url
    if url.startswith("file://"):
        return "dir", url[len("file://"):]
    if url:
        raise ValueError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path")
    return "dir", store_dir


def open_store(url: str, store_dir, poll_seconds: float = 1.0):
    """The store a URL names: s3://bucket/prefix (ObjectPromptStore), file:///path, or, when empty, the file
    store at store_dir. With an object store, store_dir holds this replica's read-through cache of version
    files: the one directory a deployment already makes writable for the store (the image's volume, a
    pod's emptyDir), where the root filesystem and the model cache may be read-only."""
    kind, where = _location(url, store_dir)
    if kind == "s3":
        from prompt_store.object_store import ObjectPromptStore  # boto3 only when it is used
        return ObjectPromptStore(where, store_dir, poll_seconds)
    return PromptStore(where)


def open_record_store(url: str, store_dir):
    """The fine-tuning files, jobs and checkpoints beside the prompt sets of the store that url names
    (prompt_store/records.py): in the same bucket under <prefix>fine_tuning/, or <store dir>/fine_tuning/."""
    from prompt_store.records import FileRecordStore

    kind, where = _location(url, store_dir)
    if kind == "s3":
        import boto3
        from botocore.config import Config

        from prompt_store.object_store import parse_s3_url
        from prompt_store.records import ObjectRecordStore

        bucket, prefix = parse_s3_url(where)
        client = boto3.client("s3", config=Config(connect_timeout=2, read_timeout=30,
                                                  retries={"max_attempts": 2, "mode": "standard"}))
        return ObjectRecordStore(client, bucket, prefix)
    return FileRecordStore(where)


__all__ = ["open_store", "open_record_store",
    "PromptSet", "PromptSetError", "PromptSetMeta",
    "PromptStore", "StoreError", "TaskNotFound", "VersionInfo",
]
