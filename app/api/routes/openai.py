"""OpenAI-compatible endpoints: `model` names a task; the base model's own id serves it bare.

Generate tasks answer as models do. Classify and extract tasks answer too, so any OpenAI client reaches
them: the label is the message content (`model: "spam"` -> "spam"), entities a JSON object
({"entities": [...]}), with the scores or entities also in an extension field of the choice.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError, body_of
from app.api.generation import guarded, run_completions, start_streams, stream_outputs
from app.api.logprobs import chat_logprobs, completion_logprobs, output_entries, prompt_entries
from app.api.openai_schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, NamedToolChoice
from app.api.schemas import Usage
from app.api.sse import sse
from app.services.tasks import ResolvedTask, TaskService
from app.services.tools import calls_grammar, parse_tool_calls

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKeyDep])


# -- models ----------------------------------------------------------------------------------------------

def _card(model_id: str, created: int, task_type: str, **extra) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "promptserve",
            "task_type": task_type, **extra}


async def _cards(tasks: TaskService) -> list[dict]:
    # the base model first, with the fingerprint prompt sets must be trained for; then every task (all
    # three types answer on the OpenAI endpoints)
    cards = [_card(tasks.base_model_id, int(time.time()), "generate", fingerprint=tasks.spec.fingerprint,
                   max_model_len=tasks.engine.max_model_len)]
    for info in await run_in_threadpool(tasks.list_tasks):
        cards.append(_card(info.task, int(info.created), info.meta.task_type, root=tasks.base_model_id,
                           active_version=info.version, max_model_len=tasks.engine.max_model_len))
    return cards


@router.get("/models")
async def list_models(tasks: TasksDep):
    return {"object": "list", "data": await _cards(tasks)}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, tasks: TasksDep):
    for card in await _cards(tasks):
        if card["id"] == model_id:
            return card
    raise ApiError(404, "model_not_found", f"the model {model_id!r} does not exist", param="model")


# -- shared ----------------------------------------------------------------------------------------------

async def _resolve(tasks: TaskService, name: str) -> ResolvedTask:
    return await run_in_threadpool(tasks.resolve, name)  # store reads (and a first hash) off the loop


async def _constraints(tasks: TaskService, found, count: int) -> list:
    """One matcher per generation (each has its own state); the grammar is compiled once (cached)."""
    if found is None:
        return [None] * count
    field, spec = found
    return [await run_in_threadpool(tasks.constraint, spec, field) for _ in range(count)]


def _check_choices(count: int) -> None:
    if count > MAX_CHOICES:
        raise ApiError(400, "invalid_request", f"n x prompts = {count} generations; at most {MAX_CHOICES} per "
                       "request", param="n")


def _error_event(exc) -> str:
    return sse(body_of(exc)) + sse("[DONE]")


async def _event_stream(tasks, resolved, jobs, metrics, settings, render, envelope: dict, include_usage: bool,
                        totals: dict) -> StreamingResponse:
    """The streamed answer of a request's generations: the endpoint's events, then a usage chunk (when asked
    for, with the totals `render` kept) and [DONE]."""
    def epilogue():
        tail = [sse({**envelope, "choices": [], "usage": Usage.of(totals["prompt"], totals["completion"]).model_dump()})] \
            if include_usage else []
        return tail + [sse("[DONE]")]

    started = await start_streams(tasks, resolved, jobs)
    return StreamingResponse(stream_outputs(started, metrics, resolved, settings.request_timeout, render,
                                            _error_event, epilogue), media_type="text/event-stream")


def _envelope(kind: str, rid: str, created: int, model: str) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model}


def _refuse_for_labelled(body, resolved: ResolvedTask, fields: list[str]) -> None:
    """Classify and extract tasks give one answer per text: generation options do not apply to them."""
    for name in fields:
        if name not in body.model_fields_set:
            continue
        value, default = getattr(body, name), type(body).model_fields[name].default
        if value is not None and value != default:
            raise ApiError(400, "invalid_request", f"model {resolved.name!r} is a {resolved.task_type} task: "
                           f"{name!r} does not apply to it", param=name)


def _answer(resolved: ResolvedTask, out: dict) -> tuple[str, dict, int]:
    """(content, extension fields, prompt tokens) of a classify or extract task's answer to one text."""
    if resolved.task_type == "classify":
        return out["label"], {"scores": out["scores"]}, out["usage"]["prompt_tokens"]
    return json.dumps({"entities": out["entities"]}, ensure_ascii=False), {"entities": out["entities"]}, \
        out["usage"]["prompt_tokens"]


LABELLED_REFUSED = ["logprobs", "top_logprobs", "echo", "tools", "response_format", "structured_outputs",
                    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "n", "suffix"]


async def _labelled(request, body, tasks, settings, metrics, resolved, texts: list[str], chat: bool):
    _refuse_for_labelled(body, resolved, LABELLED_REFUSED)
    start = time.monotonic()
    outs = await guarded(request, tasks.label(resolved, texts), settings.request_timeout)
    answers = [_answer(resolved, out) for out in outs]
    metrics.observe(resolved.name, "200", time.monotonic() - start,
                    prompt_tokens=sum(a[2] for a in answers))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    total = Usage.of(sum(a[2] for a in answers), 0).model_dump()
    if body.stream:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def events():
            for i, (content, extension, _) in enumerate(answers):
                if chat:
                    yield sse({**_envelope(kind, rid, created, body.model), "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": content}, "finish_reason": None,
                         "logprobs": None, **extension}]})
                    yield sse({**_envelope(kind, rid, created, body.model), "choices": [
                        {"index": i, "delta": {}, "finish_reason": "stop", "logprobs": None}]})
                else:
                    yield sse({**_envelope(kind, rid, created, body.model), "choices": [
                        {"index": i, "text": content, "finish_reason": "stop", "logprobs": None, **extension}]})
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**_envelope(kind, rid, created, body.model), "choices": [], "usage": total})
            yield sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c, "refusal": None}, "finish_reason": "stop",
                    "logprobs": None, **ext} for i, (c, ext, _) in enumerate(answers)]
        return {**_envelope("chat.completion", rid, created, body.model), "choices": choices, "usage": total}
    choices = [{"index": i, "text": c, "finish_reason": "stop", "logprobs": None, **ext}
               for i, (c, ext, _) in enumerate(answers)]
    return {**_envelope("text_completion", rid, created, body.model), "choices": choices, "usage": total}


# -- completions -----------------------------------------------------------------------------------------

@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                      metrics: MetricsDep):
    """OpenAI text completion; the task's prompt set is prepended to the raw prompt. `prompt` may be a
    batch (a list of strings or of token-id lists); `echo` with `logprobs` scores the prompt's tokens too
    (with `max_tokens: 0`, only them)."""
    body.refuse_unsupported()
    resolved = await _resolve(tasks, body.model)
    prompts = body.prompts()
    n = body.n or 1
    _check_choices(len(prompts) * n)
    if resolved.task_type != "generate":
        if not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "invalid_request", f"model {body.model!r} is a {resolved.task_type} task: send "
                           "the text as a string prompt", param="prompt")
        return await _labelled(request, body, tasks, settings, metrics, resolved, prompts, chat=False)
    echo, top = bool(body.echo), body.logprobs
    if body.stream and echo and top is not None:
        raise ApiError(400, "invalid_request", "echo with logprobs is not supported when streaming", param="echo")
    prompt_top = top if echo and top is not None else body.prompt_logprobs
    encoded = [p if isinstance(p, list) else await run_in_threadpool(tasks.encode, p) for p in prompts]
    found = body.constraint_spec()
    jobs = []
    for ids in encoded:
        max_tokens = tasks.max_tokens_for(resolved, ids, body.max_tokens, settings.default_max_tokens)
        constraints = await _constraints(tasks, found, n)
        jobs += [(ids, body.sampling(max_tokens, top, prompt_top, choice=j), constraints[j]) for j in range(n)]
    rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    echoed = [await run_in_threadpool(tasks.tokenizer.decode, ids) if not isinstance(p, str) else p
              for p, ids in zip(prompts, encoded)] if echo else None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sent_echo: set[int] = set()
        totals = {"prompt": 0, "completion": 0}

        def render(index: int, out):
            events = []
            text = out.text
            if echo and index not in sent_echo:
                sent_echo.add(index)
                text = echoed[index // n] + text
            if text or out.finished:
                logprobs = None
                if top is not None and out.logprobs:
                    logprobs = completion_logprobs(output_entries(out.logprobs), body.token_text(tasks.token_text))
                events.append(sse({**_envelope("text_completion", rid, created, body.model), "choices": [
                    {"index": index, "text": text, "logprobs": logprobs,
                     "finish_reason": out.finish_reason if out.finished else None}]}))
            if out.finished:
                totals["prompt"] += out.prompt_tokens
                totals["completion"] += out.completion_tokens
            return events

        return await _event_stream(tasks, resolved, jobs, metrics, settings, render,
                                   _envelope("text_completion", rid, created, body.model), include_usage, totals)

    results = await run_completions(request, tasks, metrics, resolved, jobs, settings.request_timeout)
    choices = []
    for index, (result, (ids, _, _)) in enumerate(zip(results, jobs)):
        logprobs = None
        if top is not None:
            entries = (prompt_entries(ids, result.prompt_logprobs) if echo else []) + \
                output_entries(result.logprobs or [])
            logprobs = completion_logprobs(entries, body.token_text(tasks.token_text))
        text = (echoed[index // n] if echo else "") + result.text
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
    prompt_tokens = sum(len(ids) for ids in encoded)
    return {**_envelope("text_completion", rid, created, body.model), "choices": choices,
            "usage": Usage.of(prompt_tokens, sum(r.completion_tokens for r in results)).model_dump()}


# -- chat ------------------------------------------------------------------------------------------------

def _tool_grammar(body: ChatCompletionRequest, tools: list[dict]):
    if not tools:
        return []
    parallel = body.parallel_tool_calls is not False
    if body.tool_choice == "required":
        return [("tool_choice", calls_grammar(tools, parallel=parallel))]
    if isinstance(body.tool_choice, NamedToolChoice):
        return [("tool_choice", calls_grammar(tools, only=body.tool_choice.function.name))]
    if any(t["function"].get("strict") for t in tools):  # auto: strict functions' calls follow their schemas
        return [("tools", calls_grammar(tools, parallel=parallel, optional=True))]
    return []


def _chat_message(text: str, finish_reason: str, tools: list[dict], parallel: bool) -> tuple[dict, str]:
    """(message, finish_reason) of an answer: tool calls parsed out when tools were offered."""
    if tools:
        content, calls = parse_tool_calls(text, tools)
        if calls:
            return ({"role": "assistant", "content": content, "refusal": None,
                     "tool_calls": calls if parallel else calls[:1]},
                    "tool_calls" if finish_reason == "stop" else finish_reason)
    return {"role": "assistant", "content": text, "refusal": None}, finish_reason


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, tasks: TasksDep, settings: SettingsDep,
                           metrics: MetricsDep):
    """OpenAI chat completion; the chat template is applied, the task's prompt set prepended. Structured
    outputs (`response_format`, vLLM's `structured_outputs` / `guided_*`), tools, logprobs and n > 1."""
    body.refuse_unsupported()
    resolved = await _resolve(tasks, body.model)
    n = body.n or 1
    _check_choices(n)
    if resolved.task_type != "generate":
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise ApiError(400, "invalid_request", f"model {body.model!r} is a {resolved.task_type} task: send the "
                           "text as a user message", param="messages")
        return await _labelled(request, body, tasks, settings, metrics, resolved, [users[-1].plain()["content"]],
                               chat=True)
    tools = body.tool_dicts() if body.calls_tools else []
    parallel = body.parallel_tool_calls is not False
    ids = await run_in_threadpool(tasks.encode, None, [m.plain() for m in body.messages], tools)
    found = body.constraint_spec(_tool_grammar(body, tools))
    top = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = tasks.max_tokens_for(resolved, ids, body.max_completion_tokens or body.max_tokens,
                                      settings.default_max_tokens)
    constraints = await _constraints(tasks, found, n)
    jobs = [(ids, body.sampling(max_tokens, top, choice=j), constraints[j]) for j in range(n)]
    rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk"
        started_roles: set[int] = set()
        held: dict[int, list[str]] = {}  # with tools offered, a choice's text is held to be parsed at its end
        totals = {"prompt": 0, "completion": 0}

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            return sse({**_envelope(chunk_kind, rid, created, body.model), "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]})

        def render(index: int, out):
            events = []
            if index not in started_roles:
                started_roles.add(index)
                events.append(chunk(index, {"role": "assistant", "content": ""}))
            logprobs = None
            if top is not None and out.logprobs:
                logprobs = {"content": chat_logprobs(out.logprobs, body.token_text(tasks.token_text)), "refusal": None}
            if tools:
                held.setdefault(index, []).append(out.text)
                if logprobs:
                    events.append(chunk(index, {}, logprobs=logprobs))
            elif out.text or logprobs:
                events.append(chunk(index, {"content": out.text}, logprobs=logprobs))
            if out.finished:
                finish = out.finish_reason
                if tools:
                    message, finish = _chat_message("".join(held.pop(index, [])), finish, tools, parallel)
                    delta = {"content": message["content"]} if message["content"] else {}
                    if message.get("tool_calls"):
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
                    if delta:
                        events.append(chunk(index, delta))
                events.append(chunk(index, {}, finish))
                totals["prompt"] = out.prompt_tokens
                totals["completion"] += out.completion_tokens
            return events

        return await _event_stream(tasks, resolved, jobs, metrics, settings, render,
                                   _envelope(chunk_kind, rid, created, body.model), include_usage, totals)

    results = await run_completions(request, tasks, metrics, resolved, jobs, settings.request_timeout)
    choices = []
    for index, result in enumerate(results):
        message, finish = _chat_message(result.text, result.finish_reason, tools, parallel)
        logprobs = {"content": chat_logprobs(result.logprobs or [], body.token_text(tasks.token_text)), "refusal": None} \
            if top is not None else None
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    return {**_envelope("chat.completion", rid, created, body.model), "choices": choices,
            "usage": Usage.of(len(ids), sum(r.completion_tokens for r in results)).model_dump()}
