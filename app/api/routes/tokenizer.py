"""The server's tokenizer over HTTP: vLLM's `/tokenize` and `/detokenize`, and the tokenizer files
themselves (`/v1/tokenizer/{file}`), so a benchmark or evaluation client counts tokens exactly as the
server does without downloading anything from a model hub."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyDep, TasksDep
from app.api.errors import ApiError
from app.api.fields import MAX_MESSAGES, Name, Text
from app.api.openai_schemas import ChatMessage, OpenAIModel, ToolDef

router = APIRouter(tags=["tokenizer"], dependencies=[ApiKeyDep])


class TokenizeRequest(OpenAIModel):
    model: Name | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class DetokenizeRequest(OpenAIModel):
    model: Name | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


async def _check_model(tasks, model: str | None) -> None:
    if model is not None:  # every task shares the tokenizer, but a name that is no model is an error
        await run_in_threadpool(tasks.resolve, model)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, tasks: TasksDep):
    await _check_model(tasks, body.model)
    messages = [m.plain() for m in body.messages] if body.messages is not None else None
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    ids = await run_in_threadpool(tasks.tokenize, body.prompt, messages, body.add_special_tokens,
                                  body.add_generation_prompt, tools)
    strs = [tasks.token_text(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": tasks.engine.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, tasks: TasksDep):
    await _check_model(tasks, body.model)
    return {"prompt": await run_in_threadpool(tasks.detokenize, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(tasks: TasksDep):
    """vLLM's tokenizer description: what a client with a remote tokenizer (lm-eval's) needs besides
    /tokenize and /detokenize."""
    tok = tasks.tokenizer
    return {"tokenizer_class": type(tok).__name__, "model": tasks.base_model_id, "eos_token": tok.eos_token,
            "bos_token": tok.bos_token, "pad_token": tok.pad_token, "unk_token": tok.unk_token,
            "chat_template": tok.chat_template, "vocab_size": len(tok), "model_max_length": tasks.engine.max_model_len}


@router.get("/v1/tokenizer")
async def tokenizer_files(tasks: TasksDep):
    files = await run_in_threadpool(tasks.tokenizer_files)
    return {"model": tasks.base_model_id, "files": [{"name": n, "bytes": len(b), "url": f"/v1/tokenizer/{n}"}
                                                    for n, b in files.items()]}


@router.get("/v1/tokenizer/{name}")
async def tokenizer_file(name: str, tasks: TasksDep):
    files = await run_in_threadpool(tasks.tokenizer_files)
    if name not in files:
        raise ApiError(404, "not_found", f"no tokenizer file named {name!r}; the files are {', '.join(files)}")
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return Response(files[name], media_type=media)
