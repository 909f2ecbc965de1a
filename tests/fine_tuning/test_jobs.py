"""Job records shared by API replicas and workers: a job is taken by one worker only, a silent worker's
job is taken over after its lease and fails after too many takes, a cancel reaches the worker."""

from __future__ import annotations

import threading
import time

import pytest

from fine_tuning.files import new_id
from fine_tuning.jobs import ORPHAN_MARKER_S, JobBook, JobFinished, JobLost, Lease, event
from prompt_store.records import FileRecordStore


def queued(book: JobBook, created_at: int = 0) -> dict:
    return book.create({"id": new_id("ftjob-"), "created_at": created_at or int(time.time()), "status": "queued",
                        "finished_at": None, "error": None, "_events": [], "_checkpoints": [], "_worker": None,
                        "_lease_until": 0, "_attempts": 0})


@pytest.fixture
def book(tmp_path):
    return JobBook(FileRecordStore(tmp_path))


def test_racing_workers_take_each_job_once(book):
    jobs = [queued(book, 1000 + i)["id"] for i in range(4)]
    taken: list[tuple[str, str]] = []
    start = threading.Barrier(8)

    def worker(n):
        lease = Lease(f"w{n}", seconds=60)
        start.wait()
        while (job := book.claim(lease)) is not None:
            taken.append((job["id"], lease.worker))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for j, _ in taken) == sorted(jobs)  # every job once, none twice
    for job_id, worker_id in taken:
        doc = book.get(job_id)
        assert doc["status"] == "running" and doc["_worker"] == worker_id and doc["_attempts"] == 1


def test_a_silent_workers_job_is_taken_over_then_fails(book):
    job = queued(book)["id"]
    first = Lease("first", seconds=0.2, max_attempts=2)
    assert book.claim(first)["id"] == job
    assert book.claim(Lease("second", seconds=60)) is None  # its lease holds: nobody else takes it
    time.sleep(0.3)
    second = Lease("second", seconds=0.2, max_attempts=2)
    assert book.claim(second)["_worker"] == "second"
    with pytest.raises(JobLost):  # the first worker wakes up: the job is no longer its own
        book.report(job, first, [event("late")])
    time.sleep(0.3)
    assert book.claim(Lease("third", seconds=60, max_attempts=2)) is None
    doc = book.get(job)
    assert doc["status"] == "failed" and doc["error"]["code"] == "worker_lost"
    assert "took over" in " ".join(e["message"] for e in doc["_events"])


def test_cancel_reaches_the_worker(book):
    job = queued(book)["id"]
    lease = Lease("w", seconds=60)
    book.claim(lease)
    book.report(job, lease, [event("step 1")])
    assert book.cancel(job)["status"] == "cancelled"
    with pytest.raises(JobLost) as lost:
        book.report(job, lease, [event("step 2")])
    assert lost.value.status == "cancelled"
    with pytest.raises(JobFinished):
        book.cancel(job)
    assert [e["message"] for e in book.get(job)["_events"]] == ["Fine-tuning job started", "step 1",
                                                               "Job cancelled"]


def test_checkpoints_keep_the_last_three(book, tmp_path):
    job = queued(book)
    lease = Lease("w", seconds=60)
    book.claim(lease)
    from fine_tuning.jobs import checkpoint

    for step in range(1, 6):
        book.add_checkpoint(job["id"], lease, checkpoint(job, step, {"step": step}, f"jobs/{job['id']}/ck/{step}"),
                            f"state {step}".encode())
    kept = book.get(job["id"])["_checkpoints"]
    assert [c["step_number"] for c in kept] == [3, 4, 5]
    assert book.records.blobs(f"jobs/{job['id']}/ck") == [f"jobs/{job['id']}/ck/{s}" for s in (3, 4, 5)]


def test_a_job_being_created_is_never_lost_to_a_worker_looking_at_that_moment(book):
    """Its marker is written first and the job a moment later: a worker polling between the two writes must
    not remove the marker as one a crash left (the job would stay queued forever; seen once in CI)."""
    job = queued(book, 3000)
    book.records.delete(f"jobs/{job['id']}")
    assert book.open_jobs() == [] and book.claim(Lease("w", seconds=60)) is None  # between the two writes
    assert book.records.records("open") == [f"open/{job['id']}"]
    book.records.create(f"jobs/{job['id']}", job)  # the second write
    assert book.claim(Lease("w", seconds=60))["id"] == job["id"]


def test_workers_look_only_at_open_jobs(book):
    done, waiting = queued(book, 1000)["id"], queued(book, 2000)["id"]
    book.cancel(done)
    assert book.records.records("open") == [f"open/{waiting}"]  # the ended job's marker is gone
    book.records.create(f"open/{done}", {"created_at": time.time()})  # left by a crash: its job has ended
    book.records.create("open/ftjob-vanished", {"created_at": time.time() - ORPHAN_MARKER_S - 1})  # no job
    book.records.create("open/ftjob-older", {})  # no job, written before markers had a time
    assert [d["id"] for d in book.open_jobs()] == [waiting]
    assert book.records.records("open") == [f"open/{waiting}"]
    lease = Lease("w", seconds=60)
    assert book.claim(lease)["id"] == waiting
    book.finish(waiting, lease, "succeeded")
    assert book.records.records("open") == [] and book.claim(lease) is None
