"""The fine-tuning records and blobs: compare-and-swap on both backends (a directory, and a real
S3-compatible server), so concurrent writers never lose an update and a record is created once."""

from __future__ import annotations

import threading

import pytest

from prompt_store.records import (
    FileRecordStore,
    ObjectRecordStore,
    RecordConflict,
    RecordNotFound,
    check_key,
    update,
)


@pytest.fixture(params=["file", "s3"])
def records(request, tmp_path):
    if request.param == "file":
        return FileRecordStore(tmp_path)
    seaweed = request.getfixturevalue("seaweed")
    return ObjectRecordStore(seaweed.client(), "promptsets", f"{request.node.name.replace('[', '-')[:-1]}/")


def test_create_read_swap_delete(records):
    records.create("jobs/a", {"n": 1})
    with pytest.raises(RecordConflict):
        records.create("jobs/a", {"n": 2})  # created once: a second creator loses
    doc, tag = records.read("jobs/a")
    assert doc == {"n": 1}
    records.swap("jobs/a", {"n": 2}, tag)
    with pytest.raises(RecordConflict):
        records.swap("jobs/a", {"n": 3}, tag)  # a write based on a stale read is refused
    assert records.read("jobs/a")[0] == {"n": 2}
    assert records.records("jobs") == ["jobs/a"]
    records.delete("jobs/a")
    with pytest.raises(RecordNotFound):
        records.read("jobs/a")
    assert records.records("jobs") == []


def test_blobs(records):
    records.put_blob("files/f1", b"one")
    records.put_blob("jobs/j/checkpoints/step-1", b"ck")
    assert records.get_blob("files/f1") == b"one"
    assert records.blobs("files") == ["files/f1"]
    assert records.blobs("jobs/j/checkpoints") == ["jobs/j/checkpoints/step-1"]
    records.delete_blob("files/f1")
    with pytest.raises(RecordNotFound):
        records.get_blob("files/f1")


def test_concurrent_updates_lose_nothing(records):
    records.create("jobs/counter", {"n": 0, "by": []})

    def bump(i):
        for _ in range(5):
            update(records, "jobs/counter", lambda d: {"n": d["n"] + 1, "by": d["by"] + [i]})

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = records.read("jobs/counter")[0]
    assert doc["n"] == 30 and sorted(doc["by"]) == sorted(i for i in range(6) for _ in range(5))


def test_keys_are_checked():
    for bad in ("", "../x", "a//b", "/a", "a/../b", "a b"):
        with pytest.raises(ValueError):
            check_key(bad)
    assert check_key("jobs/ftjob-1/checkpoints/trial-1-step-4") == "jobs/ftjob-1/checkpoints/trial-1-step-4"
