"""OpenAI-compatible endpoints: `model` names a task; the base model's own id serves it bare."""

import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import Field

from app.api.deps import ApiKeyDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError
from app.api.generation import run_completion, start_stream, stream_outputs
from app.api.schemas import MAX_MESSAGES, Name, SamplingFields, StrictModel, Text, Usage
from app.api.sse import sse

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKeyDep])


class StreamOptions(StrictModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    model: Name
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="OpenAI's default is 1.0; 0 = greedy")
    n: int = Field(1, ge=1, le=1, description="only n=1 is served")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None


class CompletionRequest(OpenAIFields):
    prompt: Text | list[Text] = Field(description="a string, or a list of exactly one string")
    max_tokens: int | None = Field(16, ge=1, le=1_000_000)


class ContentPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatMessageIn(StrictModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)


async def _generate_task(tasks, name: str):
    resolved = await run_in_threadpool(tasks.resolve, name)  # store reads (and a first hash) off the loop
    if resolved.task_type != "generate":
        raise ApiError(400, "invalid_request", f"model {name!r} is a {resolved.task_type} task; use "
                                               f"POST /v1/tasks/{name} for it")
    return resolved


def _error_event(exc) -> str:
    return sse({"error": {"type": exc.type, "message": exc.message, "code": exc.status}}) + sse("[DONE]")


@router.get("/models")
async def list_models(tasks: TasksDep):
    created = int(time.time())
    # the base model first, with the fingerprint prompt sets must be trained for
    models = [{"id": tasks.base_model_id, "object": "model", "created": created, "owned_by": "promptserve",
               "fingerprint": tasks.spec.fingerprint}]
    models += [{"id": info.task, "object": "model", "created": int(info.created), "owned_by": "promptserve",
                "task_type": info.meta.task_type} for info in await run_in_threadpool(tasks.list_tasks)]
    return {"object": "list", "data": models}


async def _serve(request, body, tasks, settings, metrics, ids, resolved, kind: str):
    sampling = body.sampling(tasks.max_tokens_for(resolved, ids, body.max_tokens, settings.default_max_tokens))
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if kind == "chat" else "text_completion"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_role = False

        def chunk(choice: dict, usage=None) -> str:
            data = {"id": rid, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                    "model": body.model, "choices": [choice] if choice else []}
            if include_usage:
                data["usage"] = usage
            return sse(data)

        def render(out):
            nonlocal sent_role
            events = []
            if kind == "chat" and not sent_role:
                events.append(chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}))
                sent_role = True
            if out.text:
                delta = {"delta": {"content": out.text}} if kind == "chat" else {"text": out.text}
                events.append(chunk({"index": 0, **delta, "finish_reason": None, "logprobs": None}))
            if out.finished:
                end = {"delta": {}} if kind == "chat" else {"text": ""}
                events.append(chunk({"index": 0, **end, "finish_reason": out.finish_reason, "logprobs": None}))
                if include_usage:
                    events.append(chunk({}, Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()))
                events.append(sse("[DONE]"))
            return events

        started = await start_stream(tasks, resolved, ids, sampling)
        return StreamingResponse(stream_outputs(started, metrics, resolved, settings.request_timeout, render,
                                                _error_event), media_type="text/event-stream")
    result = await run_completion(request, tasks, metrics, resolved, ids, sampling, settings.request_timeout)
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}} if kind == "chat"
              else {"index": 0, "text": result.text})
    return {"id": rid, "object": obj, "created": created, "model": body.model,
            "choices": [{**choice, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": Usage.of(result.prompt_tokens, result.completion_tokens).model_dump()}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                      metrics: MetricsDep):
    """OpenAI text completion; the task's prompt set is prepended to the raw prompt."""
    resolved = await _generate_task(tasks, body.model)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "invalid_request", "send one prompt per request (a list of exactly one string)")
        prompt = prompt[0]
    ids = await run_in_threadpool(tasks.encode, prompt)  # tokenizing a long text must not block the loop
    return await _serve(request, body, tasks, settings, metrics, ids, resolved, "text")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                           metrics: MetricsDep):
    """OpenAI chat completion; the chat template is applied, the task's prompt set prepended."""
    resolved = await _generate_task(tasks, body.model)
    if body.max_completion_tokens and not body.max_tokens:
        body.max_tokens = body.max_completion_tokens
    ids = await run_in_threadpool(tasks.encode, None, [m.plain() for m in body.messages])
    return await _serve(request, body, tasks, settings, metrics, ids, resolved, "chat")
