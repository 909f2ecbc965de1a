"""The shape of the OpenAI endpoints' answers, built in one place: the envelope (id, object, created,
model), choices, stream chunks and usage. Usage counts each prompt's tokens once, however many choices
(`n`) it has, and every choice's completion tokens, streamed or not (the copies this replaced disagreed:
a streamed completion with n=3 counted its prompt three times)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_serializer

from app.api.schemas import Usage
from app.api.sse import sse

Kind = Literal["text_completion", "chat.completion"]


class _Choice(BaseModel):
    # extension fields of classify and extract answers (`scores`, `entities`) ride along on a choice
    model_config = ConfigDict(extra="allow")

    index: int
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionChoice(_Choice):
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[dict] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)  # OpenAI leaves the key out when there are no calls
        return out


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatDeltaChoice(_Choice):
    delta: dict


class _Envelope(BaseModel):
    id: str
    object: str  # narrowed by each answer's kind
    created: int
    model: str


class CompletionResponse(_Envelope):
    object: Literal["text_completion", "chat.completion"]
    choices: list[CompletionChoice] | list[ChatChoice]
    usage: Usage


class StreamChunk(_Envelope):
    object: Literal["text_completion", "chat.completion.chunk"]
    choices: list[CompletionChoice] | list[ChatDeltaChoice]
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _usage_when_given(self, handler):
        out = handler(self)
        if out.get("usage") is None:
            out.pop("usage", None)
        return out


@dataclass
class UsageCounter:
    """n: choices per prompt; generation i belongs to prompt i // n."""

    n: int = 1
    prompt: dict[int, int] = field(default_factory=dict)
    completion: int = 0

    def add(self, index: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt[index // self.n] = prompt_tokens
        self.completion += completion_tokens

    def usage(self) -> Usage:
        return Usage.of(sum(self.prompt.values()), self.completion)


@dataclass
class Reply:
    """One request's answer: its envelope, and its usage as generations finish."""

    kind: Kind
    model: str
    n: int = 1
    id: str = ""
    created: int = 0
    counter: UsageCounter = field(init=False)

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        self.created = self.created or int(time.time())
        self.counter = UsageCounter(self.n)

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"

    def finished(self, index: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.counter.add(index, prompt_tokens, completion_tokens)

    def envelope(self, streamed: bool = False) -> dict:
        return {"id": self.id, "object": self.chunk_kind if streamed else self.kind, "created": self.created,
                "model": self.model}

    def response(self, choices: list[CompletionChoice] | list[ChatChoice]) -> dict:
        return CompletionResponse(**self.envelope(), choices=choices, usage=self.counter.usage()).model_dump()

    # -- streams -----------------------------------------------------------------------------------
    def chunk(self, choice: CompletionChoice | ChatDeltaChoice) -> str:
        return sse(StreamChunk(**self.envelope(streamed=True), choices=[choice]).model_dump())

    def chat_delta(self, index: int, delta: dict, finish_reason: str | None = None, logprobs=None,
                   **extension) -> str:
        return self.chunk(ChatDeltaChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                          **extension))

    def text_piece(self, index: int, text: str, finish_reason: str | None = None, logprobs=None,
                   **extension) -> str:
        return self.chunk(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                           **extension))

    def epilogue(self, include_usage: bool) -> list[str]:
        """The end of a stream: a usage chunk when asked for, then [DONE]."""
        tail = [sse(StreamChunk(**self.envelope(streamed=True), choices=[], usage=self.counter.usage()).model_dump())] \
            if include_usage else []
        return tail + [sse("[DONE]")]
