"""Request and response bodies of the task endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.api.fields import MAX_MESSAGES, Stops, StrictModel, Text, sampling_params, valid_unicode
from app.api.openai_schemas import ChatMessage
from app.api.structured_outputs import ResponseFormat, StructuredOutputs
from app.engine.types import SamplingParams


class SamplingFields(StrictModel):
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stops = None
    ignore_eos: bool = False

    def sampling(self, max_tokens: int) -> SamplingParams:
        return sampling_params(self, max_tokens)


class TaskRequest(SamplingFields):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 64}]})

    prompt: Text | None = Field(None, description="generate tasks: raw text, no template applied")
    text: Text | None = Field(None, min_length=1, max_length=20_000,
                              description="classify and extract tasks: the text to label")
    texts: list[Annotated[str, Field(min_length=1, max_length=20_000), AfterValidator(valid_unicode)]] | None = \
        Field(None, min_length=1, max_length=256, description="classify and extract tasks: several texts at once, "
              "answered in order")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES,
                                               description="Chat; the template is applied")
    stream: bool = Field(False, description="Stream tokens as server-sent events")
    response_format: ResponseFormat | None = Field(None, description="generate tasks: json_object or json_schema")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="generate tasks: exactly one of json (a schema), regex, choice, grammar")

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.prompt, self.messages, self.text, self.texts)) != 1:
            raise ValueError("give exactly one of 'prompt', 'messages' (generate tasks), 'text' or 'texts' "
                             "(classify and extract tasks)")
        return self


class PromptSetRefOut(BaseModel):
    name: str
    version: int | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    prompt_set: PromptSetRefOut
    usage: Usage


class PromptSetVersionOut(BaseModel):
    name: str
    version: int
    active: bool
    kind: str
    task_type: str
    num_virtual_tokens: int
    labels: list[str]
    size: int
    sha256: str
    created: float
    description: str = ""


class TaskVersionsOut(BaseModel):
    name: str
    active_version: int | None
    versions: list[PromptSetVersionOut]


class TaskOut(BaseModel):
    name: str
    type: str
    kind: str | None
    labels: list[str]
    active_version: int | None
    num_virtual_tokens: int


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskOut]


class ClassifyResponse(BaseModel):
    label: str
    scores: dict[str, float]
    prompt_set: PromptSetRefOut


class Entity(BaseModel):
    text: str
    label: str
    start: int = Field(description="character offset of the first character")
    end: int = Field(description="character offset one past the last character")


class ExtractResponse(BaseModel):
    entities: list[Entity]
    prompt_set: PromptSetRefOut


class BatchResponse(BaseModel):
    """The answers to `texts`, in their order."""
    object: Literal["list"] = "list"
    data: list[ClassifyResponse | ExtractResponse]
    prompt_set: PromptSetRefOut
