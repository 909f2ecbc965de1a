"""Fine-tuning job records (OpenAI's `fine_tuning.job`), shared by the API replicas and the training workers.

One record a job, changed only by compare-and-swap (prompt_store/records.py), so:
- a worker takes a job by swapping it from `queued` to `running` with its id and a lease; of two workers
  that try at once, one swap fails and that worker looks for another job;
- a running worker renews its lease while it reports (events, checkpoints); a worker that dies stops
  renewing, and once the lease has run out another worker takes the job over and resumes it from its last
  checkpoint, up to `max_attempts` takes, after which the job fails with the reason: never 'running' forever;
- a cancel is a swap to `cancelled`; the worker's next report sees it and stops (within seconds).

Statuses: validating_files -> queued -> running -> succeeded | failed | cancelled. An unfinished job also has
a marker record `open/<id>` (made before the job, removed once it has ended), so a worker looking for work
lists the open jobs, not every job there ever was (on S3, one LIST a poll instead of a GET per job).
Our own fields start with '_' (events, checkpoints, the lease) and never reach the API as they are."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fine_tuning.files import new_id
from prompt_store.records import RecordConflict, RecordNotFound, RecordStore, update

TERMINAL = ("succeeded", "failed", "cancelled")
# A marker with no job is one a crash left between its two writes -- or one whose job is being written this
# moment (the marker goes first): it is removed only once older than this, never under a job's creation.
ORPHAN_MARKER_S = 300.0
KEPT_CHECKPOINTS = 3  # OpenAI keeps the last three epochs' checkpoints too


class JobNotFound(LookupError):
    pass


class JobFinished(Exception):
    """The job has ended: it cannot be cancelled."""


class JobLost(Exception):
    """This worker no longer holds the job: it was cancelled, or taken over after the lease ran out."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Lease:
    worker: str
    seconds: float = 30.0
    max_attempts: int = 3


def event(message: str, level: str = "info", data: dict | None = None, type: str = "message") -> dict:
    return {"id": new_id("ftevent-"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
            "level": level, "message": message, "data": data or {}, "type": type}


def checkpoint(job: dict, step: int, metrics: dict, blob: str) -> dict:
    return {"id": new_id("ftckpt-"), "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
            "fine_tuned_model_checkpoint": f"{job['id']}:ckpt-step-{step}", "fine_tuning_job_id": job["id"],
            "metrics": metrics, "step_number": step, "_blob": blob}


class JobBook:
    def __init__(self, records: RecordStore):
        self.records = records

    @staticmethod
    def _key(job_id: str) -> str:
        if not isinstance(job_id, str) or not job_id.startswith("ftjob-") or not job_id[6:].isalnum():
            raise JobNotFound(f"no fine-tuning job with id {job_id!r}")
        return f"jobs/{job_id}"

    # -- reading -----------------------------------------------------------------------------------
    def get(self, job_id: str) -> dict:
        try:
            return self.records.read(self._key(job_id))[0]
        except RecordNotFound:
            raise JobNotFound(f"no fine-tuning job with id {job_id!r}") from None

    def list(self) -> list[dict]:
        """Newest first."""
        docs = []
        for key in self.records.records("jobs"):
            try:
                docs.append(self.records.read(key)[0])
            except RecordNotFound:
                continue
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]), reverse=True)

    # -- writing -----------------------------------------------------------------------------------
    def create(self, doc: dict) -> dict:
        # first: a job is never open without its marker (its time: see ORPHAN_MARKER_S)
        self.records.create(f"open/{doc['id']}", {"created_at": time.time()})
        self.records.create(self._key(doc["id"]), doc)
        return doc

    def closed(self, job_id: str) -> None:
        """The job has ended: its open marker goes (a marker left by a crash here is removed by claim())."""
        self.records.delete(f"open/{job_id}")

    def open_jobs(self) -> list[dict]:
        """The jobs that have not ended, oldest first; markers of jobs that ended removed, and those of jobs
        that never were once ORPHAN_MARKER_S old."""
        docs = []
        for key in self.records.records("open"):
            job_id = key.split("/", 1)[1]
            try:
                doc = self.get(job_id)
            except JobNotFound:
                if self._marker_age(key) > ORPHAN_MARKER_S:
                    self.closed(job_id)
                continue
            if doc["status"] in TERMINAL:
                self.closed(job_id)
                continue
            docs.append(doc)
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]))

    def _marker_age(self, key: str) -> float:
        try:
            marker = self.records.read(key)[0]
        except RecordNotFound:
            return 0.0  # removed meanwhile: nothing to do
        return time.time() - marker.get("created_at", 0.0)  # markers written before it had a time: old

    def update(self, job_id: str, change) -> dict:
        try:
            return update(self.records, self._key(job_id), change)
        except RecordNotFound:
            raise JobNotFound(f"no fine-tuning job with id {job_id!r}") from None

    def cancel(self, job_id: str) -> dict:
        def change(doc):
            if doc["status"] in TERMINAL:
                raise JobFinished(f"job {job_id} has already {doc['status']}: there is nothing to cancel")
            doc.update(status="cancelled", finished_at=int(time.time()))
            doc["_events"].append(event("Job cancelled"))
            return doc

        doc = self.update(job_id, change)
        self.closed(job_id)
        return doc

    # -- the worker's side -------------------------------------------------------------------------
    def claim(self, lease: Lease) -> dict | None:
        """The oldest job that is queued, or running on a lease that ran out, now this worker's; None when
        there is none. A job taken over too often fails instead, naming why."""
        now = time.time()
        candidates = [d for d in self.open_jobs()
                      if d["status"] == "queued" or (d["status"] == "running" and d["_lease_until"] < now)]
        for doc in candidates:
            def take(current, seen=doc):
                if current["status"] != seen["status"] or current["_lease_until"] != seen["_lease_until"]:
                    raise RecordConflict("taken meanwhile")
                current["_attempts"] += 1
                if current["_attempts"] > lease.max_attempts:
                    current.update(status="failed", finished_at=int(time.time()), error={
                        "code": "worker_lost", "param": None,
                        "message": f"the training worker stopped {lease.max_attempts} times without finishing "
                                   "the job (killed, out of memory, or its machine went away)"})
                    current["_events"].append(event(current["error"]["message"], "error"))
                    return current
                resumed = seen["status"] == "running"
                current["_taken_by"] = current.get("_taken_by", []) + [lease.worker]
                current.update(status="running", _worker=lease.worker, _lease_until=time.time() + lease.seconds)
                current["_events"].append(event(
                    f"Worker {lease.worker} took over the job: its previous worker stopped renewing its lease"
                    if resumed else "Fine-tuning job started", "warn" if resumed else "info"))
                return current

            try:
                taken = self.update(doc["id"], take)
            except (RecordConflict, JobNotFound):
                continue  # another worker was first, or the job went away
            if taken["status"] == "running" and taken["_worker"] == lease.worker:
                return taken
            if taken["status"] in TERMINAL:
                self.closed(doc["id"])
        return None

    def report(self, job_id: str, lease: Lease, events: list[dict] = (), **fields) -> dict:
        """Renews this worker's lease, adds events and sets fields; JobLost when the job is no longer this
        worker's (cancelled, or taken over), and then nothing is written."""
        def change(doc):
            if doc["status"] != "running" or doc["_worker"] != lease.worker:
                raise JobLost(doc["status"], "cancelled" if doc["status"] == "cancelled"
                              else f"the job is now {doc['status']} on worker {doc['_worker']}")
            doc["_events"].extend(events)
            doc.update(fields, _lease_until=time.time() + lease.seconds)
            return doc

        return self.update(job_id, change)

    def add_checkpoint(self, job_id: str, lease: Lease, entry: dict, data: bytes, events: list[dict] = ()) -> None:
        """The checkpoint's bytes first, then its entry; the oldest beyond KEPT_CHECKPOINTS are removed."""
        self.records.put_blob(entry["_blob"], data)
        dropped: list[dict] = []

        def change(doc):
            if doc["status"] != "running" or doc["_worker"] != lease.worker:
                raise JobLost(doc["status"], f"the job is now {doc['status']}")
            doc["_checkpoints"].append(entry)
            dropped[:] = doc["_checkpoints"][:-KEPT_CHECKPOINTS]
            doc["_checkpoints"] = doc["_checkpoints"][-KEPT_CHECKPOINTS:]
            doc["_events"].extend(events)
            doc["_lease_until"] = time.time() + lease.seconds
            return doc

        try:
            self.update(job_id, change)
        except JobLost:
            self.records.delete_blob(entry["_blob"])
            raise
        for old in dropped:
            self.records.delete_blob(old["_blob"])

    def finish(self, job_id: str, lease: Lease, status: str, events: list[dict] = (), **fields) -> dict:
        def change(doc):
            if doc["status"] != "running" or doc["_worker"] != lease.worker:
                raise JobLost(doc["status"], f"the job is now {doc['status']}")
            doc["_events"].extend(events)
            doc.update(fields, status=status, finished_at=int(time.time()), _worker=None, estimated_finish=None)
            return doc

        doc = self.update(job_id, change)
        self.closed(job_id)
        return doc
