"""Request and response bodies of the task endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.types import SamplingParams


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] | str | None = Field(None, description="Stop strings (the text ends before them)")
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("at most 16 non-empty stop strings")
        return stops

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=tuple(self.stop or ()),
                              ignore_eos=self.ignore_eos)


class TaskRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 64}]})

    prompt: str | None = Field(None, description="generate tasks: raw text, no template applied")
    text: str | None = Field(None, min_length=1, max_length=20_000,
                             description="classify and extract tasks: the text to label")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat; the template is applied")
    stream: bool = Field(False, description="Stream tokens as server-sent events")

    @model_validator(mode="after")
    def _one_input(self):
        if sum(x is not None for x in (self.prompt, self.messages, self.text)) != 1:
            raise ValueError("give exactly one of 'prompt', 'messages' (generate tasks) or 'text' "
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
