"""Request bodies of the OpenAI-compatible endpoints, strict: a field this server does not know is
refused with 400 naming it (`extra="forbid"`), and a field it knows but does not implement is refused
when it asks for anything but the default (`unsupported_settings`). Nothing is dropped silently."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from app.api.errors import ApiError
from app.api.fields import MAX_MESSAGES, ClosedModel, Name, Stops, Text, sampling_params
from app.api.structured_outputs import ResponseFormat, StructuredOutputs, output_format
from app.engine.constraints import ConstraintSpec
from app.engine.types import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16  # n x prompts per request: each is a sequence of the running batch


OpenAIModel = ClosedModel


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk


class SamplingExtras(OpenAIModel):
    """The sampling fields both endpoints take: OpenAI's, and vLLM's extras that clients send."""

    model: Name
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=1024)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stops = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="OpenAI's default is 1.0; 0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: Name | None = None  # an end-user id for the caller's own abuse tracking: nothing to do here
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=2.0)  # below, logits / penalty overflow
    ignore_eos: bool | None = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: Text | None = None
    return_tokens_as_token_ids: bool | None = False  # vLLM's: logprobs name tokens "token_id:<id>"

    def token_text(self, text_of):
        """How log-probabilities name a token: its text, or its id when asked (vLLM's option)."""
        return (lambda t: f"token_id:{t}") if self.return_tokens_as_token_ids else text_of

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for key in v or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of integers), got {key!r}")
        return v

    # Fields OpenAI defines that this server does not implement: refused unless they ask for the default.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    def refuse_unsupported(self) -> None:
        for name, allowed in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ApiError(400, "unsupported_field", f"{name!r} is not supported by this server "
                               f"(got {json.dumps(value)[:200]})", param=name)

    def constraint_spec(self, extra: list[tuple[str, ConstraintSpec]] = ()) -> tuple[str, ConstraintSpec] | None:
        """(field, spec) of the one grammar the request asks its output to follow, if any."""
        guided = [(name, kind, getattr(self, name)) for name, kind in (
            ("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
            ("guided_grammar", "grammar"))]
        return output_format(self.response_format, self.structured_outputs, guided, extra, bool(self.ignore_eos))

    def sampling(self, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None,
                 choice: int = 0) -> SamplingParams:
        return sampling_params(self, max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, choice=choice)


# -- completions -----------------------------------------------------------------------------------------

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1_000_000)]


class CompletionRequest(SamplingExtras):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_CHOICES)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_CHOICES)] = Field(
            description="a string, a list of strings, a list of token ids, or a list of lists of token ids")
    max_tokens: int | None = Field(16, ge=0, le=1_000_000, description="0 with echo: score the prompt")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Text | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"suffix": (None,)}

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ApiError(400, "unsupported_field", "'best_of' other than n is not supported by this server",
                           param="best_of")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


# -- chat ------------------------------------------------------------------------------------------------

class TextPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class FunctionCall(OpenAIModel):
    name: Name
    arguments: Text


class ToolCall(OpenAIModel):
    id: Name
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Name | None = None
    refusal: Text | None = None  # an assistant message echoed back from a reply carries it (null)

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if out["content"] is None:
            out["content"] = ""
        return out


class FunctionDef(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(OpenAIModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIModel):
    name: Name


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingExtras):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's, not implemented here: refused unless they ask for the default
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: Name | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: Name | None = None  # an end-user id, like `user`

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
                   "audio": (None,), "modalities": (["text"],), "prediction": (None,), "reasoning_effort": (None,),
                   "verbosity": (None,), "web_search_options": (None,), "functions": (None,),
                   "function_call": (None,), "store": (False,), "metadata": (None,),
                   "service_tier": ("auto", "default"), "prompt_cache_key": (None,),
                   "prompt_cache_retention": (None,)}

    @model_validator(mode="after")
    def _tools(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, NamedToolChoice):
            if not self.tools:
                raise ValueError("tool_choice 'required' or a named function needs tools")
        return self

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def calls_tools(self) -> bool:
        """Whether tools are offered (and so the answer is parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"
