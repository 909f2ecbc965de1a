"""Running a generation for an HTTP request: per-request timeout, cancellation when the client leaves,
metrics. Shared by the task endpoint and the OpenAI-compatible endpoints."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request

from app.api.errors import ApiError
from app.engine.types import RequestOutput, SamplingParams
from app.observability import Metrics
from app.services.errors import ServiceError
from app.services.tasks import Completion, ResolvedTask, TaskService

log = logging.getLogger(__name__)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def guarded(request: Request, work: Awaitable, timeout: float):
    """Await work, cancelling it (and so the engine request) on timeout or when the client disconnects."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        job.cancel()
        if watcher in done:
            raise ApiError(499, "client_closed_request", "the client disconnected; generation cancelled")
        raise ApiError(504, "timeout", f"the request took longer than {timeout:g} s and was cancelled")
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()


async def run_completion(request: Request, tasks: TaskService, metrics: Metrics, task: ResolvedTask,
                         ids: list[int], sampling: SamplingParams, timeout: float) -> Completion:
    start = time.monotonic()
    try:
        result = await guarded(request, tasks.complete(task, ids, sampling), timeout)
    except (ApiError, ServiceError) as exc:
        metrics.observe(task.name, str(exc.status))
        raise
    metrics.observe(task.name, "200", time.monotonic() - start, result.first_token_s, result.prompt_tokens,
                    result.completion_tokens)
    return result


async def start_stream(tasks: TaskService, task: ResolvedTask, ids: list[int], sampling: SamplingParams):
    """Submit a streamed generation and wait for its first output, so that a refusal (invalid request,
    full queue) becomes a proper HTTP status rather than an error inside a 200 stream."""
    start = time.monotonic()
    outputs = tasks.stream(task, ids, sampling)
    first = await outputs.__anext__()
    return outputs, first, start


async def _chain(first, rest):
    yield first
    async for out in rest:
        yield out


async def stream_outputs(started, metrics: Metrics, task: ResolvedTask, timeout: float,
                         render: Callable[[RequestOutput], list[str]],
                         render_error: Callable[[ServiceError | ApiError], str]) -> AsyncIterator[str]:
    """Server-sent events of one generation. A client that disconnects closes this generator, which
    aborts the engine request at its next step; the timeout ends the stream with an error event."""
    outputs, first_out, start = started
    first = None
    final = None
    try:
        async with asyncio.timeout(timeout):
            async for out in _chain(first_out, outputs):
                if first is None and out.token_ids:
                    first = time.monotonic() - start
                final = out
                for event in render(out):
                    yield event
    except TimeoutError:
        metrics.observe(task.name, "504")
        yield render_error(ApiError(504, "timeout", f"the request took longer than {timeout:g} s"))
        return
    except (ServiceError, ApiError) as exc:
        metrics.observe(task.name, str(exc.status))
        yield render_error(exc)
        return
    except Exception as exc:  # a bug: the stream still ends with the one error shape, and it is logged
        log.exception("stream of %s failed", task.name)
        metrics.observe(task.name, "500")
        yield render_error(ApiError(500, "internal_error", f"internal server error: {type(exc).__name__}"))
        return
    finally:
        await outputs.aclose()
    metrics.observe(task.name, "200", time.monotonic() - start, first, final.prompt_tokens if final else 0,
                    final.completion_tokens if final else 0)
