"""Request ids, in-flight accounting and the draining gate, as plain ASGI middleware (it must not buffer
streamed responses, and must let routes see client disconnects)."""

from __future__ import annotations

import re
import uuid

from app.api.errors import error_response
from app.observability import request_id_var

EXEMPT = {"/health", "/ready", "/metrics"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class ServingMiddleware:
    def __init__(self, app, state):
        self.app = app
        self.state = state  # the FastAPI app.state: draining flag and in-flight count live there

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        exempt = scope["path"] in EXEMPT

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if self.state.draining and not exempt:
                refusal = error_response(503, "unavailable", "the server is shutting down",
                                         {"Retry-After": "5", "Connection": "close"})
                await refusal(scope, receive, send_with_id)
                return
            if not exempt:
                self.state.inflight += 1
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if not exempt:
                    self.state.inflight -= 1
        finally:
            request_id_var.reset(token)
