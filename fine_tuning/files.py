"""Uploaded files (OpenAI's Files API, purpose `fine-tune`): the bytes as a blob, the file object as a record.

A file is checked line by line when it is uploaded (fine_tuning/data_files.py), so a job never starts on
one that cannot train; its record keeps what it trains (task type, rows, labels) for job validation."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fine_tuning.data_files import FileSummary, parse_rows
from prompt_store.records import RecordNotFound, RecordStore

PURPOSES = ("fine-tune",)  # what may be uploaded
RESULTS_PURPOSE = "fine-tune-results"  # what a job writes: its step metrics as CSV (OpenAI's result_files)


class FileNotFoundInStore(LookupError):
    pass


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int = 64 << 20
    max_lines: int = 100_000


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def public(doc: dict) -> dict:
    """A record as the API shows it: the fields OpenAI defines, not ours (they start with '_')."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}


class FileBook:
    def __init__(self, records: RecordStore, limits: FileLimits = FileLimits()):
        self.records, self.limits = records, limits

    def upload(self, filename: str, purpose: str, data: bytes) -> dict:
        """Checks every line (DataFileError names the first bad one), stores the bytes, then the record."""
        _, summary = parse_rows(data, self.limits.max_lines)
        return self._store(filename, purpose, data, summary.__dict__)

    def add_result(self, filename: str, data: bytes) -> dict:
        """A file a job wrote (its results): stored like an upload, never a training file."""
        return self._store(filename, RESULTS_PURPOSE, data, None)

    def _store(self, filename: str, purpose: str, data: bytes, summary: dict | None) -> dict:
        """The bytes, then the record (a reader never finds a record without its bytes)."""
        file_id = new_id("file-")
        self.records.put_blob(f"files/{file_id}", data)
        doc = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
               "expires_at": None, "_summary": summary}
        self.records.create(f"files/{file_id}", doc)
        return doc

    def get(self, file_id: str) -> dict:
        try:
            return self.records.read(self._key(file_id))[0]
        except RecordNotFound:
            raise FileNotFoundInStore(f"no file with id {file_id!r}") from None

    def summary(self, file_id: str) -> FileSummary:
        return FileSummary(**self.get(file_id)["_summary"])

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        try:
            return self.records.get_blob(self._key(file_id))
        except RecordNotFound:
            raise FileNotFoundInStore(f"file {file_id!r} has no content (deleted meanwhile)") from None

    def list(self, purpose: str | None = None) -> list[dict]:
        """Newest first."""
        docs = []
        for key in self.records.records("files"):
            try:
                doc = self.records.read(key)[0]
            except RecordNotFound:  # deleted meanwhile
                continue
            if purpose is None or doc["purpose"] == purpose:
                docs.append(doc)
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]), reverse=True)

    def delete(self, file_id: str) -> None:
        """The record goes first (the file is gone for every reader), then the bytes. A job already running
        on it keeps the rows it read; one that has not started fails with the reason."""
        key = self._key(file_id)
        self.get(file_id)
        self.records.delete(key)
        self.records.delete_blob(key)

    @staticmethod
    def _key(file_id: str) -> str:
        if not isinstance(file_id, str) or not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise FileNotFoundInStore(f"no file with id {file_id!r}")
        return f"files/{file_id}"
