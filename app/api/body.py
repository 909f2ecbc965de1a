"""Reading a request body against a size cap: the admin upload (its own, larger cap, read after the admin
token is checked) and every other route (in the serving middleware) share it."""

from __future__ import annotations

from typing import AsyncIterator

from app.api.errors import ApiError


async def read_body_capped(declared_length: str | None, chunks: AsyncIterator[bytes], limit: int,
                           what: str = "request body") -> bytes:
    """The whole body, or ApiError 413 as soon as the declared or the received length passes the limit.
    A client that leaves meanwhile raises whatever `chunks` raises for it (starlette's ClientDisconnect)."""
    if declared_length and declared_length.isdigit() and int(declared_length) > limit:
        raise ApiError(413, "too_large", f"{what} of {declared_length} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too_large", f"{what} exceeds the limit of {limit} bytes")
    return bytes(body)
