"""OpenAI-compatible endpoints: `model` names a task; the base model's own id serves it bare.

Generate tasks answer as models do. Classify and extract tasks answer too, so any OpenAI client reaches
them: the label is the message content (`model: "spam"` -> "spam"), entities a JSON object
({"entities": [...]}), with the scores or entities also in an extension field of the choice.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, MetricsDep, SettingsDep, TasksDep
from app.api.errors import ApiError, body_of
from app.api.generation import guarded, refuse_generation_options, run_completions, start_streams, stream_outputs
from app.api.logprobs import chat_logprobs, completion_logprobs, output_entries, prompt_entries
from app.api.openai_replies import AssistantMessage, ChatChoice, CompletionChoice, Reply
from app.api.openai_schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, NamedToolChoice
from app.api.sse import sse
from app.services.tasks import ResolvedTask, TaskService
from app.services.tools import StreamedToolText, calls_grammar, parse_tool_calls

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


async def _event_stream(tasks, resolved, jobs, metrics, settings, render, reply: Reply,
                        include_usage: bool) -> StreamingResponse:
    """The streamed answer of a request's generations: the endpoint's events, then a usage chunk (when asked
    for) and [DONE]."""
    started = await start_streams(tasks, resolved, jobs)
    return StreamingResponse(stream_outputs(started, metrics, resolved, settings.request_timeout, render,
                                            _error_event, lambda: reply.epilogue(include_usage)),
                             media_type="text/event-stream")


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def _answer(resolved: ResolvedTask, out: dict) -> tuple[str, dict, int]:
    """(content, extension fields, prompt tokens) of a classify or extract task's answer to one text."""
    if resolved.task_type == "classify":
        return out["label"], {"scores": out["scores"]}, out["usage"]["prompt_tokens"]
    return json.dumps({"entities": out["entities"]}, ensure_ascii=False), {"entities": out["entities"]}, \
        out["usage"]["prompt_tokens"]


# OpenAI request fields that only generation uses
LABELLED_REFUSED = ["logprobs", "top_logprobs", "echo", "tools", "response_format", "structured_outputs",
                    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "n", "suffix"]


async def _labelled(request, body, tasks, settings, metrics, resolved, texts: list[str], chat: bool):
    refuse_generation_options(body, resolved, LABELLED_REFUSED)
    start = time.monotonic()
    outs = await guarded(request, tasks.label(resolved, texts), settings.request_timeout)
    answers = [_answer(resolved, out) for out in outs]
    metrics.observe(resolved.name, "200", time.monotonic() - start,
                    prompt_tokens=sum(a[2] for a in answers))
    reply = Reply("chat.completion" if chat else "text_completion", body.model)
    for i, (_, _, prompt_tokens) in enumerate(answers):
        reply.finished(i, prompt_tokens, 0)
    if body.stream:
        def events():
            for i, (content, extension, _) in enumerate(answers):
                if chat:
                    yield reply.chat_delta(i, {"role": "assistant", "content": content}, **extension)
                    yield reply.chat_delta(i, {}, "stop")
                else:
                    yield reply.text_piece(i, content, "stop", **extension)
            yield from reply.epilogue(_include_usage(body))
        return StreamingResponse(events(), media_type="text/event-stream")
    if chat:
        return reply.response([ChatChoice(index=i, message=AssistantMessage(content=c), finish_reason="stop", **ext)
                               for i, (c, ext, _) in enumerate(answers)])
    return reply.response([CompletionChoice(index=i, text=c, finish_reason="stop", **ext)
                           for i, (c, ext, _) in enumerate(answers)])


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
    reply = Reply("text_completion", body.model, n)
    echoed = [await run_in_threadpool(tasks.tokenizer.decode, ids) if not isinstance(p, str) else p
              for p, ids in zip(prompts, encoded)] if echo else None

    if body.stream:
        sent_echo: set[int] = set()

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
                events.append(reply.text_piece(index, text, out.finish_reason if out.finished else None, logprobs))
            if out.finished:
                reply.finished(index, out.prompt_tokens, out.completion_tokens)
            return events

        return await _event_stream(tasks, resolved, jobs, metrics, settings, render, reply, _include_usage(body))

    results = await run_completions(request, tasks, metrics, resolved, jobs, settings.request_timeout)
    choices = []
    for index, (result, (ids, _, _)) in enumerate(zip(results, jobs)):
        logprobs = None
        if top is not None:
            entries = (prompt_entries(ids, result.prompt_logprobs) if echo else []) + \
                output_entries(result.logprobs or [])
            logprobs = completion_logprobs(entries, body.token_text(tasks.token_text))
        text = (echoed[index // n] if echo else "") + result.text
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=result.finish_reason))
        reply.finished(index, len(ids), result.completion_tokens)
    return reply.response(choices)


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


def _with_calls(calls: list[dict], finish_reason: str, parallel: bool) -> tuple[list[dict], str]:
    """The calls an answer makes (only the first with parallel_tool_calls off) and its finish reason."""
    return (calls if parallel else calls[:1]), ("tool_calls" if finish_reason == "stop" else finish_reason)


def _chat_message(text: str, finish_reason: str, tools: list[dict], parallel: bool) -> tuple[AssistantMessage, str]:
    """(message, finish_reason) of an answer: tool calls parsed out when tools were offered."""
    if tools:
        content, calls = parse_tool_calls(text, tools)
        if calls:
            calls, finish_reason = _with_calls(calls, finish_reason, parallel)
            return AssistantMessage(content=content, tool_calls=calls), finish_reason
    return AssistantMessage(content=text), finish_reason


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
    reply = Reply("chat.completion", body.model, n)

    if body.stream:
        started_roles: set[int] = set()
        held: dict[int, StreamedToolText] = {}  # with tools offered: what may be a call is held to its end

        def render(index: int, out):
            events = []
            if index not in started_roles:
                started_roles.add(index)
                events.append(reply.chat_delta(index, {"role": "assistant", "content": ""}))
            logprobs = None
            if top is not None and out.logprobs:
                logprobs = {"content": chat_logprobs(out.logprobs, body.token_text(tasks.token_text)), "refusal": None}
            if tools:
                content = held.setdefault(index, StreamedToolText(tools)).feed(out.text)
                if content or logprobs:
                    events.append(reply.chat_delta(index, {"content": content} if content else {}, logprobs=logprobs))
            elif out.text or logprobs:
                events.append(reply.chat_delta(index, {"content": out.text}, logprobs=logprobs))
            if out.finished:
                finish = out.finish_reason
                if tools:
                    content, calls = held.pop(index, StreamedToolText(tools)).finish()
                    delta = {"content": content} if content else {}
                    if calls:
                        calls, finish = _with_calls(calls, finish, parallel)
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
                    if delta:
                        events.append(reply.chat_delta(index, delta))
                events.append(reply.chat_delta(index, {}, finish))
                reply.finished(index, out.prompt_tokens, out.completion_tokens)
            return events

        return await _event_stream(tasks, resolved, jobs, metrics, settings, render, reply, _include_usage(body))

    results = await run_completions(request, tasks, metrics, resolved, jobs, settings.request_timeout)
    choices = []
    for index, result in enumerate(results):
        message, finish = _chat_message(result.text, result.finish_reason, tools, parallel)
        logprobs = {"content": chat_logprobs(result.logprobs or [], body.token_text(tasks.token_text)),
                    "refusal": None} if top is not None else None
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish))
        reply.finished(index, len(ids), result.completion_tokens)
    return reply.response(choices)
