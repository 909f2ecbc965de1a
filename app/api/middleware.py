"""Request ids, in-flight accounting and the draining gate, as plain ASGI middleware (it must not buffer
streamed responses, and must let routes see client disconnects)."""

from __future__ import annotations

import json
import re
import uuid

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
                body = json.dumps({"error": {"type": "unavailable", "status": 503,
                                             "message": "the server is shutting down"}}).encode()
                await send_with_id({"type": "http.response.start", "status": 503,
                                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                                                (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
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
