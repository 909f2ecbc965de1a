"""Request bodies of the files and fine-tuning endpoints, as OpenAI defines them, plus our one extension
(`prompt_set`: what a prompt set needs that OpenAI's schema has no field for). Closed: a field OpenAI has and
we do not implement (integrations, the dpo and reinforcement methods) is refused by name."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from app.api.fields import ClosedModel, Name, Text
from app.services.fine_tuning import MAX_VIRTUAL_TOKENS, JobRequest, PromptSetOptions

Auto = Literal["auto"]
Label = Annotated[str, Field(min_length=1, max_length=64)]


class Hyperparameters(ClosedModel):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class Supervised(ClosedModel):
    hyperparameters: Hyperparameters | None = None


class Method(ClosedModel):
    # "dpo" and "reinforcement" train a model's weights on preference or graded data: not prompt tuning
    type: Literal["supervised"]
    supervised: Supervised | None = None


class PromptSetIn(ClosedModel):
    """promptserve's extension (send it as `extra_body={"prompt_set": {...}}` with the openai SDK)."""
    kind: Literal["deep", "input"] | None = None
    virtual_tokens: Annotated[int, Field(ge=1, le=MAX_VIRTUAL_TOKENS)] | None = None
    task_type: Literal["generate", "classify", "extract"] | None = None
    labels: Annotated[list[Label], Field(min_length=1, max_length=256)] | None = None
    init_text: Annotated[Text, Field(max_length=2000)] | None = None


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        if len(value) > 16:
            raise ValueError("at most 16 keys")
        for k, v in value.items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError("keys of at most 64 characters, values of at most 512")
    return value


class JobCreate(ClosedModel):
    model: Name
    training_file: Name
    validation_file: Name | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Annotated[str, Field(max_length=64)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[str, str] | None, AfterValidator(_metadata)] = None
    integrations: Annotated[list[dict], Field(max_length=0, description="not supported: refused when given")] \
        | None = None
    prompt_set: PromptSetIn | None = None

    @model_validator(mode="after")
    def _one_hyperparameter_place(self):
        inner = self.method and self.method.supervised and self.method.supervised.hyperparameters
        if self.hyperparameters is not None and inner is not None:
            raise ValueError("give hyperparameters in method.supervised.hyperparameters or in hyperparameters, "
                             "not both")
        return self

    def to_request(self) -> JobRequest:
        inner = self.method and self.method.supervised and self.method.supervised.hyperparameters
        hyper = (inner or self.hyperparameters or Hyperparameters()).model_dump()
        opts = self.prompt_set.model_dump() if self.prompt_set else {}
        return JobRequest(model=self.model, training_file=self.training_file, validation_file=self.validation_file,
                          suffix=self.suffix, seed=self.seed, hyperparameters=hyper, metadata=self.metadata,
                          prompt_set=PromptSetOptions(**opts))
