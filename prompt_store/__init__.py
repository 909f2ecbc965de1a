"""The prompt-set file format and the versioned, crash-safe store of prompt sets."""

from prompt_store.format import PromptSet, PromptSetError, PromptSetMeta
from prompt_store.store import PromptStore, StoreError, TaskNotFound, VersionInfo


def open_store(url: str, store_dir, poll_seconds: float = 1.0):
    """The store a URL names: s3://bucket/prefix (ObjectPromptStore), file:///path, or, when empty, the file
    store at store_dir. With an object store, store_dir holds this replica's read-through cache of version
    files: the one directory a deployment already makes writable for the store (the image's volume, a
    pod's emptyDir), where the root filesystem and the model cache may be read-only."""
    if url.startswith("s3://"):
        from prompt_store.object_store import ObjectPromptStore  # boto3 only when it is used
        return ObjectPromptStore(url, store_dir, poll_seconds)
    if url.startswith("file://"):
        return PromptStore(url[len("file://"):])
    if url:
        raise ValueError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path")
    return PromptStore(store_dir)

def open_record_store(url: str, store_dir):
    """The fine-tuning files, jobs and checkpoints beside the prompt sets of the store that url names
    (prompt_store/records.py): in the same bucket under <prefix>fine_tuning/, or <store dir>/fine_tuning/."""
    from prompt_store.records import FileRecordStore

    if url.startswith("s3://"):
        import boto3
        from botocore.config import Config

        from prompt_store.object_store import parse_s3_url
        from prompt_store.records import ObjectRecordStore

        bucket, prefix = parse_s3_url(url)
        client = boto3.client("s3", config=Config(connect_timeout=2, read_timeout=30,
                                                  retries={"max_attempts": 2, "mode": "standard"}))
        return ObjectRecordStore(client, bucket, prefix)
    if url.startswith("file://"):
        return FileRecordStore(url[len("file://"):])
    if url:
        raise ValueError(f"unsupported store URL {url!r}: use s3://bucket/prefix or file:///path")
    return FileRecordStore(store_dir)


__all__ = ["open_store", "open_record_store",
    "PromptSet", "PromptSetError", "PromptSetMeta",
    "PromptStore", "StoreError", "TaskNotFound", "VersionInfo",
]
