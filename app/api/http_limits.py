"""Limits at the HTTP connection level, which uvicorn does not set: the size of a request's headers, how
long a client may take to send them, how long a request body may stall, and how slowly it may come.

Without them a 16 MiB header was accepted, and connections that never finished their headers (or their
body) were held open forever: 300 slowloris connections, each with its buffers, never closed. uvicorn's
httptools protocol is extended, not replaced: the parser callbacks it already has count and time.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import error_body


def _reply_and_close(transport: asyncio.Transport, status: str, message: str) -> None:
    body = json.dumps(error_body(int(status[:3]), "http_error", message)).encode()
    transport.write(b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
    transport.close()


class _LimitExceeded(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = 64 * 1024
    header_timeout = 10.0  # seconds from a request's first byte (or the connection) to its last header
    body_timeout = 30.0  # seconds a request body may go without a new byte
    # a body trickled a few bytes at a time never stalls: after a grace it must average this many bytes a
    # second (20 uploads at 10 bytes/s were held open past a minute without it); 0 turns it off
    body_min_rate = 1024
    body_rate_grace = 5.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0  # bytes received since the current request began, until its headers end
        self._in_headers = True
        self._rejected = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.header_timeout, "408 Request Timeout", "request headers not received in time")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float, status: str, message: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire, status, message)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, status: str, message: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
            self.transport.close()  # a response is under way: nothing else can be said on this connection
            return
        self._rejected = True
        _reply_and_close(self.transport, status, message)

    # -- parser callbacks ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        try:
            super().data_received(data)
        except _LimitExceeded:
            return
        # Counted after the parser has seen the chunk: only while the headers are still unfinished (a
        # chunk that also carries the body, or a large body, is not header bytes). This catches a header
        # that never ends, which the parser reports only once it does; the reading transport's chunks
        # (at most 256 KiB) bound what is buffered before the check.
        if self._in_headers and not self._rejected:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers()

    def send_400_response(self, msg: str) -> None:
        if self._rejected:  # our own refusal already went out; the parser error it caused says nothing new
            return
        super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0
        self._parsed_header_bytes = 0
        self._arm(self.header_timeout, "408 Request Timeout", "request headers not received in time")

    def _refuse_headers(self) -> None:
        self._disarm()
        self._rejected = True
        _reply_and_close(self.transport, "431 Request Header Fields Too Large",
                         f"request line and headers exceed {self.max_header_bytes} bytes")

    def _count(self, n: int) -> None:
        """Exact accounting of what the parser reports (a burst of many requests counts per request)."""
        self._parsed_header_bytes += n
        if self._parsed_header_bytes > self.max_header_bytes:
            self._refuse_headers()
            raise _LimitExceeded  # stops the parser; caught in data_received

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._body_started, self._body_bytes = self.loop.time(), 0
        super().on_headers_complete()
        self._arm(self.body_timeout, "408 Request Timeout", "request body stalled")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        elapsed = self.loop.time() - self._body_started
        if self.body_min_rate and elapsed > self.body_rate_grace and \
                self._body_bytes < self.body_min_rate * elapsed:
            self._disarm()
            self._expire("408 Request Timeout", f"request body sent too slowly: {self._body_bytes} bytes in "
                         f"{elapsed:.0f} s, under the minimum of {self.body_min_rate} bytes a second")
            raise _LimitExceeded  # stops the parser; caught in data_received
        self._arm(self.body_timeout, "408 Request Timeout", "request body stalled")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers = False  # until the next request on this connection begins
        super().on_message_complete()


def guarded_protocol(max_header_bytes: int, header_timeout: float, body_timeout: float,
                     body_min_rate: int = GuardedHttpToolsProtocol.body_min_rate) -> type:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    return type("GuardedHttpProtocol", (GuardedHttpToolsProtocol,), {
        "max_header_bytes": max_header_bytes, "header_timeout": header_timeout, "body_timeout": body_timeout,
        "body_min_rate": body_min_rate})
