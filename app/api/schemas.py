"""Request and response bodies of the task endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.types import SamplingParams

# Every text a request carries is bounded: the context holds a few thousand tokens, so 100,000 characters
# is far more than any prompt that could run, and a 50 MB prompt is refused before it is tokenized.
MAX_TEXT_CHARS = 100_000
MAX_MESSAGES = 512
MAX_NAME_CHARS = 256


def _valid_unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\ud800"); no tokenizer can encode it: refuse it by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_valid_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_valid_unicode)]
StopString = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_valid_unicode)]


class StrictModel(BaseModel):
    # JSON as Python reads it allows NaN and Infinity: no number field of the API means either
    model_config = ConfigDict(allow_inf_nan=False)


class ClosedModel(StrictModel):
    """A request body that refuses a field it does not define (400 naming it): never dropped silently."""
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", populate_by_name=True)


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class SamplingFields(StrictModel):
    max_tokens: int | None = Field(None, ge=1, le=1_000_000, description="Tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[StopString] | StopString | None = Field(None, description="Stop strings (the text ends before them)")
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
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid", json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 64}]})

    prompt: Text | None = Field(None, description="generate tasks: raw text, no template applied")
    text: Text | None = Field(None, min_length=1, max_length=20_000,
                              description="classify and extract tasks: the text to label")
    texts: list[Annotated[str, Field(min_length=1, max_length=20_000), AfterValidator(_valid_unicode)]] | None = \
        Field(None, min_length=1, max_length=256, description="classify and extract tasks: several texts at once, "
              "answered in order")
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES,
                                               description="Chat; the template is applied")
    stream: bool = Field(False, description="Stream tokens as server-sent events")
    response_format: "ResponseFormat | None" = Field(None, description="generate tasks: json_object or json_schema")
    structured_outputs: "StructuredOutputs | None" = Field(
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


from app.api.output_format import ResponseFormat, StructuredOutputs  # noqa: E402  (it imports this module)

TaskRequest.model_rebuild()
