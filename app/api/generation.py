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
                         ids: list[int], sampling: SamplingParams, timeout: float, constraint=None) -> Completion:
    start = time.monotonic()
    try:
        result = await guarded(request, tasks.complete(task, ids, sampling, constraint=constraint), timeout)
    except (ApiError, ServiceError) as exc:
        metrics.observe(task.name, str(exc.status))
        raise
    metrics.observe(task.name, "200", time.monotonic() - start, result.first_token_s, result.prompt_tokens,
                    result.completion_tokens)
    return result


async def run_completions(request: Request, tasks: TaskService, metrics: Metrics, task: ResolvedTask,
                          jobs: list[tuple[list[int], SamplingParams, object]], timeout: float) -> list[Completion]:
    """Several generations of one request (n choices, a batch of prompts), run side by side in the engine's
    batch; the first failure fails the request and cancels the rest."""
    if len(jobs) == 1:
        ids, sampling, constraint = jobs[0]
        return [await run_completion(request, tasks, metrics, task, ids, sampling, timeout, constraint)]
    runs = [asyncio.ensure_future(run_completion(request, tasks, metrics, task, ids, sampling, timeout, constraint))
            for ids, sampling, constraint in jobs]
    try:
        return list(await asyncio.gather(*runs))
    finally:
        for run in runs:
            run.cancel()


async def start_stream(tasks: TaskService, task: ResolvedTask, ids: list[int], sampling: SamplingParams,
                       constraint=None):
    """Submit a streamed generation and wait for its first output, so that a refusal (invalid request,
    full queue) becomes a proper HTTP status rather than an error inside a 200 stream."""
    start = time.monotonic()
    outputs = tasks.stream(task, ids, sampling, constraint=constraint)
    try:
        first = await outputs.__anext__()
    except BaseException:
        await outputs.aclose()
        raise
    return outputs, first, start


async def start_streams(tasks: TaskService, task: ResolvedTask,
                        jobs: list[tuple[list[int], SamplingParams, object]]) -> list:
    """Start several generations side by side (submitted together, so identical prompts can share their
    prefill); if any is refused, the others are closed and the refusal raised."""
    runs = [asyncio.ensure_future(start_stream(tasks, task, ids, sampling, constraint))
            for ids, sampling, constraint in jobs]
    await asyncio.wait(runs)
    failed = next((r.exception() for r in runs if r.exception() is not None), None)
    if failed is not None:
        for r in runs:
            if r.exception() is None:
                await r.result()[0].aclose()
        raise failed
    return [r.result() for r in runs]


async def _chain(first, rest):
    yield first
    async for out in rest:
        yield out


_END = object()


async def _pump(index: int, started, into: asyncio.Queue) -> None:
    outputs, first, _ = started
    try:
        async for out in _chain(first, outputs):
            await into.put((index, out))
    except BaseException as exc:  # the consumer reports it (cancellation included: it asked for that)
        await into.put((index, exc))
        return
    finally:
        await outputs.aclose()
    await into.put((index, _END))


async def stream_outputs(started: list, metrics: Metrics, task: ResolvedTask, timeout: float,
                         render: Callable[[int, RequestOutput], list[str]],
                         render_error: Callable[[ServiceError | ApiError], str],
                         epilogue: Callable[[], list[str]] = lambda: []) -> AsyncIterator[str]:
    """Server-sent events of one request's generations (several with n > 1 or a batch of prompts),
    interleaved as their tokens come. A client that disconnects closes this generator, which aborts the
    engine requests at their next step; the timeout or any failure ends the stream with an error event."""
    queue: asyncio.Queue = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(i, s, queue)) for i, s in enumerate(started)]
    start = min(s[2] for s in started)
    firsts: dict[int, float] = {}
    open_ = len(started)
    try:
        async with asyncio.timeout(timeout):
            while open_:
                index, item = await queue.get()
                if item is _END:
                    open_ -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.token_ids and index not in firsts:
                    firsts[index] = time.monotonic() - start
                if item.finished:
                    metrics.observe(task.name, "200", time.monotonic() - start, firsts.get(index),
                                    item.prompt_tokens, item.completion_tokens)
                for event in render(index, item):
                    yield event
        for event in epilogue():
            yield event
    except TimeoutError:
        metrics.observe(task.name, "504")
        yield render_error(ApiError(504, "timeout", f"the request took longer than {timeout:g} s"))
    except (ServiceError, ApiError) as exc:
        metrics.observe(task.name, str(exc.status))
        yield render_error(exc)
    except Exception as exc:  # a bug: the stream still ends with the one error shape, and it is logged
        log.error("stream of %s failed", task.name, exc_info=(type(exc), exc, exc.__traceback__))
        metrics.observe(task.name, "500")
        yield render_error(ApiError(500, "internal_error", f"internal server error: {type(exc).__name__}"))
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def refuse_generation_options(body, task: ResolvedTask, fields: list[str]) -> None:
    """Classify and extract tasks give one answer per text: a generation option a request set to anything but
    its default is refused by name (the task endpoint and the OpenAI endpoints alike)."""
    for name in fields:
        if name not in body.model_fields_set:
            continue
        value, default = getattr(body, name), type(body).model_fields[name].default
        if value is not None and value != default:
            raise ApiError(400, "invalid_request", f"model {task.name!r} is a {task.task_type} task: {name!r} "
                           "does not apply to it", param=name)
