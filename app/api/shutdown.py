"""SIGTERM drain: stop taking work (503), let in-flight requests finish up to a grace period, then exit."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, grace: float):
        super().__init__(config)
        self.state = state
        self.grace = grace
        self._draining_since: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._draining_since is not None:  # a second signal: stop now
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._draining_since = time.monotonic()
        self.state.draining = True
        log.info("draining: refusing new requests, %d in flight, grace %.0f s", self.state.inflight, self.grace)
        threading.Thread(target=self._wait_then_exit, args=(sig, frame), daemon=True).start()

    def _wait_then_exit(self, sig, frame) -> None:
        deadline = self._draining_since + self.grace
        while self.state.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state.inflight:
            log.warning("grace period over with %d requests in flight; exiting", self.state.inflight)
        self.should_exit = True
