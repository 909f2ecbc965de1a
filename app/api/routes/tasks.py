import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError, body_of
from app.api.generation import guarded, refuse_generation_options, run_completion, start_stream, stream_outputs
from app.api.schemas import (
    BatchResponse,
    ClassifyResponse,
    ExtractResponse,
    GenerateResponse,
    PromptSetRefOut,
    TaskList,
    TaskOut,
    TaskRequest,
    Usage,
)
from app.api.sse import sse
from app.api.structured_outputs import output_format

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


@router.post("/tasks/{task}", response_model=GenerateResponse | ClassifyResponse | ExtractResponse | BatchResponse)
async def run_task(task: str, body: TaskRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                   metrics: MetricsDep):
    """Run a task with its active prompt set: generate text (`prompt` or `messages`, optionally streamed as
    server-sent events, optionally following a `response_format` or `structured_outputs`), classify a
    `text`, or extract entities from a `text` (`texts`: several, answered in order)."""
    resolved = await run_in_threadpool(tasks.resolve, task)  # store reads (and a first hash) off the loop
    ref = PromptSetRefOut(name=resolved.name, version=resolved.version)
    if resolved.task_type != "generate":
        return await _label(task, body, request, tasks, settings, metrics, resolved, ref)
    if body.text is not None or body.texts is not None:
        raise ApiError(400, "invalid_request", f"task {task!r} is a generate task: send 'prompt' or 'messages'",
                       param="text")
    messages = [m.plain() for m in body.messages] if body.messages is not None else None
    ids = await run_in_threadpool(tasks.encode, body.prompt, messages)  # not on the event loop
    sampling = body.sampling(tasks.max_tokens_for(resolved, ids, body.max_tokens, settings.default_max_tokens))
    found = output_format(body.response_format, body.structured_outputs, ignore_eos=body.ignore_eos)
    constraint = await run_in_threadpool(tasks.constraint, found[1], found[0]) if found else None
    if body.stream:
        def render(_, out):
            if not (out.text or out.finished):
                return []
            event = {"text": out.text, "finish_reason": out.finish_reason if out.finished else None,
                     "prompt_set": ref.model_dump()}
            if out.finished:
                event["usage"] = Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()
            return [sse(event)] + ([sse("[DONE]")] if out.finished else [])

        def render_error(exc):  # an error event ends the stream as a finished one does: with [DONE]
            return sse(body_of(exc)) + sse("[DONE]")

        started = await start_stream(tasks, resolved, ids, sampling, constraint)
        events = stream_outputs([started], metrics, resolved, settings.request_timeout, render, render_error)
        return StreamingResponse(events, media_type="text/event-stream")
    result = await run_completion(request, tasks, metrics, resolved, ids, sampling, settings.request_timeout,
                                  constraint)
    return GenerateResponse(
        text=result.text, finish_reason=result.finish_reason, prompt_set=ref,
        usage=Usage.of(result.prompt_tokens, result.completion_tokens))


# the task request's fields that only generate tasks use
GENERATION_FIELDS = ["response_format", "structured_outputs", "stream", "max_tokens", "temperature", "top_p", "top_k",
                     "seed", "stop", "ignore_eos"]


async def _label(task, body, request, tasks, settings, metrics, resolved, ref):
    """Classify or extract one `text`, or several `texts` (answered in order)."""
    texts = body.texts if body.texts is not None else [body.text] if body.text is not None else None
    if texts is None:
        raise ApiError(400, "invalid_request", f"task {task!r} is a {resolved.task_type} task: send 'text' or "
                       "'texts'", param="text")
    refuse_generation_options(body, resolved, GENERATION_FIELDS)
    start = time.monotonic()
    outs = await guarded(request, tasks.label(resolved, texts), settings.request_timeout)
    metrics.observe(task, "200", time.monotonic() - start, prompt_tokens=sum(o["usage"]["prompt_tokens"] for o in outs))
    answers = [ClassifyResponse(label=o["label"], scores=o["scores"], prompt_set=ref)
               if resolved.task_type == "classify" else ExtractResponse(entities=o["entities"], prompt_set=ref)
               for o in outs]
    if body.texts is None:
        return answers[0]
    return BatchResponse(data=answers, prompt_set=ref)
