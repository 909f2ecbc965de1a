"""`promptserve worker`: takes queued fine-tuning jobs from the store and trains them, one at a time.

It runs in its own process, never in the server's (training would hold the engine's cores and its Python
thread): `promptserve serve` starts one beside itself at the lowest CPU priority with one thread
(PROMPTSERVE_TRAINING_THREADS / _NICE), and at scale workers run as their own Deployment or Job against the
shared store. Any number may run: a job is taken by a compare-and-swap on its record (fine_tuning/jobs.py).
SIGTERM: the job in hand goes back to the queue (to resume from its last checkpoint) and the worker exits."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid

from fine_tuning.files import FileBook, FileLimits
from fine_tuning.jobs import JobBook, Lease

log = logging.getLogger("promptserve.worker")


def lower_priority(nice: int, threads: int, gpu_memory_fraction: float) -> None:
    """The worker's budget: its CPU priority, its torch threads, and on a GPU its share of the memory."""
    import torch

    from fine_tuning.supervisor import renice

    renice(nice)  # already done before exec when `serve` started this worker; not when run on its own
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)


class Worker:
    def __init__(self, settings, records=None, store=None, worker_id: str | None = None):
        from prompt_store import open_record_store, open_store

        self.settings = settings
        records = records or open_record_store(settings.store_url, settings.store_dir)
        self.store = store or open_store(settings.store_url, settings.store_dir, settings.store_poll_seconds)
        self.book = JobBook(records)
        self.files = FileBook(records, FileLimits(settings.files_max_mb << 20, settings.files_max_lines))
        self.lease = Lease(worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                           settings.training_lease_seconds, settings.training_max_attempts)
        self.stop = threading.Event()
        self._runner = None

    @property
    def runner(self):
        if self._runner is None:  # torch and the model only once there is a job
            from fine_tuning.runner import JobRunner

            self._runner = JobRunner(self.book, self.files, self.store, self.settings, self.lease,
                                     stopping=self.stop.is_set)
        return self._runner

    def run_once(self) -> bool:
        """Takes one job and runs it to its end; False when none was waiting."""
        job = self.book.claim(self.lease)
        if job is None:
            return False
        log.info("job %s taken by %s (attempt %d)", job["id"], self.lease.worker, job["_attempts"])
        self.runner.run(job)
        return True

    def run_forever(self) -> None:
        log.info("training worker %s: waiting for jobs", self.lease.worker)
        while not self.stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the store unreachable, a record unreadable: try again later
                log.exception("looking for a job failed")
                busy = False
            if not busy:
                self.stop.wait(self.settings.training_poll_seconds)


def main(args) -> int:
    from app.settings import get_settings

    settings = get_settings()
    lower_priority(settings.training_nice, settings.training_threads, settings.training_gpu_memory_fraction)
    worker = Worker(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop.set())
    worker.run_forever()
    return 0
