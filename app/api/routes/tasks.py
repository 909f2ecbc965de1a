import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError, body_of
from app.api.generation import guarded, run_completion, start_stream, stream_outputs
from app.api.schemas import (ClassifyResponse, ExtractResponse, GenerateResponse, PromptSetRefOut, TaskList, TaskOut,
                             TaskRequest, Usage)
from app.api.sse import sse

router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[ApiKeyDep])


@router.get("/tasks", response_model=TaskList)
async def list_tasks(tasks: TasksDep):
    """The tasks this server serves: the base model itself, and every task with an active prompt set."""
    data = [TaskOut(name=tasks.base_model_id, type="generate", kind=None, labels=[], active_version=None,
                    num_virtual_tokens=0)]
    for info in await run_in_threadpool(tasks.list_tasks):  # reads every task's metadata from the store
        data.append(TaskOut(name=info.task, type=info.meta.task_type, kind=info.meta.kind,
                            labels=list(info.meta.labels), active_version=info.version,
                            num_virtual_tokens=info.meta.num_virtual_tokens))
    return TaskList(data=data)


@router.post("/tasks/{task}", response_model=GenerateResponse | ClassifyResponse | ExtractResponse)
async def run_task(task: str, body: TaskRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                   metrics: MetricsDep):
    """Run a task with its active prompt set: generate text (`prompt` or `messages`, optionally streamed as
    server-sent events), classify a `text`, or extract entities from a `text`."""
    resolved = await run_in_threadpool(tasks.resolve, task)  # store reads (and a first hash) off the loop
    ref = PromptSetRefOut(name=resolved.name, version=resolved.version)
    if resolved.task_type != "generate":
        if body.text is None:
            raise ApiError(400, "invalid_request", f"task {task!r} is a {resolved.task_type} task: send 'text'",
                           param="text")
        start = time.monotonic()
        run = tasks.classify if resolved.task_type == "classify" else tasks.extract
        out = await guarded(request, run(resolved, body.text), settings.request_timeout)
        metrics.observe(task, "200", time.monotonic() - start, prompt_tokens=out["usage"]["prompt_tokens"])
        if resolved.task_type == "classify":
            return ClassifyResponse(label=out["label"], scores=out["scores"], prompt_set=ref)
        return ExtractResponse(entities=out["entities"], prompt_set=ref)
    if body.text is not None:
        raise ApiError(400, "invalid_request", f"task {task!r} is a generate task: send 'prompt' or 'messages'",
                       param="text")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    ids = await run_in_threadpool(tasks.encode, body.prompt, messages)  # not on the event loop
    sampling = body.sampling(tasks.max_tokens_for(resolved, ids, body.max_tokens, settings.default_max_tokens))
    if body.stream:
        def render(_, out):
            if not (out.text or out.finished):
                return []
            event = {"text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                     "prompt_set": ref.model_dump()}
            if out.finished:
                event["usage"] = Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()
            return [sse(event)] + ([sse("[DONE]")] if out.finished else [])

        def render_error(exc):
            return sse(body_of(exc))

        started = await start_stream(tasks, resolved, ids, sampling)
        events = stream_outputs([started], metrics, resolved, settings.request_timeout, render, render_error)
        return StreamingResponse(events, media_type="text/event-stream")
    result = await run_completion(request, tasks, metrics, resolved, ids, sampling, settings.request_timeout)
    return GenerateResponse(
        text=result.text, finish_reason=result.finish_reason, prompt_set=ref,
        usage=Usage.of(result.prompt_tokens, result.completion_tokens))
