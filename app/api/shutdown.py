"""SIGTERM drain: stop taking work (503), let in-flight requests finish, and exit within the grace period.

When requests are still running as the grace period nears its end, the engine fails them with a clear
error (streams get an error event, then [DONE]) so that every client is answered before the process
exits; the process then exits with status 0 within the grace period.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)

# Seconds before the end of the grace period at which still-running requests are cut, so their error
# events are delivered and the connections closed before it ends.
CUT_MARGIN = 2.0
SHUTDOWN_TIMEOUT = 0.5  # uvicorn's own wait for connections, after ours (the config must match)


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
        threading.Thread(target=self._wait_then_exit, daemon=True).start()

    def _wait_until(self, deadline: float) -> None:
        while self.state.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_then_exit(self) -> None:
        start = self._draining_since
        end = start + max(self.grace - SHUTDOWN_TIMEOUT, 0.0)
        self._wait_until(start + max(self.grace - CUT_MARGIN, self.grace / 2))
        if self.state.inflight:
            log.warning("grace period ending with %d requests in flight; failing them", self.state.inflight)
            engine = getattr(self.state, "engine", None)
            if engine is not None:
                engine.cancel_all("the server is shutting down: this request was cut at the end of its "
                                  "drain period")
            self._wait_until(end)
        self.should_exit = True
