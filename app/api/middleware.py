"""Request ids, in-flight accounting and the draining gate, as plain ASGI middleware (it must not buffer
streamed responses, and must let routes see client disconnects)."""

from __future__ import annotations

import logging
import re
import uuid

from starlette.requests import ClientDisconnect

from app.api.body import read_body_capped
from app.api.errors import ApiError, error_response
from app.observability import request_id_var

log = logging.getLogger(__name__)

EXEMPT = {"/health", "/ready", "/metrics"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


def reads_own_body(path: str) -> bool:
    """The uploads read their bodies themselves, against their own larger caps and after the admin token is
    checked: prompt sets (/admin/...) and training files (POST /v1/files)."""
    return path.startswith("/admin/") or path == "/v1/files"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Every HTML page the server serves (the playground, /docs, /redoc) may load nothing from another host: the
# browser itself refuses it, so a page works the same with no internet and leaks no visit to a CDN (ReDoc's
# bundle asks for a logo on cdn.redoc.ly; refused, it hides it). Inline script and style: Swagger UI's page
# starts with an inline script, ReDoc styles inline; workers from blob: are ReDoc's search.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    b"frame-ancestors 'self'; base-uri 'self'; form-action 'self'")


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

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers_out = list(message.get("headers") or []) + [(b"x-request-id", request_id.encode())]
                if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers_out):
                    headers_out += [(b"content-security-policy", CONTENT_SECURITY_POLICY),
                                    (b"x-content-type-options", b"nosniff")]
                message["headers"] = headers_out
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
                if scope["method"] in BODY_METHODS and not reads_own_body(scope["path"]):
                    receive = await self._capped_body(headers, receive, scope, send_with_id)
                    if receive is None:
                        return
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                # the last resort: a bug still answers with the one error body, and the log has the id
                log.error("unhandled %s in %s %s", type(exc).__name__, scope["method"], scope["path"],
                          exc_info=(type(exc), exc, exc.__traceback__))
                if not started:  # else the response is under way: closing the connection says it
                    await error_response(500, "internal_error", f"internal server error (request id "
                                         f"{request_id})")(scope, receive, send_with_id)
            finally:
                if not exempt:
                    self.state.inflight -= 1
        finally:
            request_id_var.reset(token)

    async def _capped_body(self, headers: dict, receive, scope, send):
        """Read the request body up to the configured cap and hand the app a receive() that replays it;
        None when the request was answered here (413) or the client left."""
        async def chunks():
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                yield message.get("body", b"")
                more = message.get("more_body", False)

        try:
            body = await read_body_capped(headers.get(b"content-length", b"").decode("latin-1"), chunks(),
                                          self.state.settings.max_request_bytes)
        except ClientDisconnect:
            return None
        except ApiError as exc:
            await error_response(exc.status, exc.code, f"{exc.message} (PROMPTSERVE_MAX_REQUEST_BYTES)",
                                 {"Connection": "close"})(scope, receive, send)
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices, as the app expects
        return replay
