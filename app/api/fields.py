"""Field types and base models every request body shares (the task endpoint's, the OpenAI endpoints', the
tokenizer's), and the one place a request's sampling fields become the engine's SamplingParams.

Bodies are strict: a number is a JSON number and a flag a JSON boolean (`"max_tokens": "10"`,
`"stream": "yes"` and `"tokens": ["1"]` are refused by name, not coerced), NaN and Infinity are refused,
and a closed body refuses a field it does not define."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.engine.types import SamplingParams

# Every text a request carries is bounded: the context holds a few thousand tokens, so 100,000 characters
# is far more than any prompt that could run, and a 50 MB prompt is refused before it is tokenized.
MAX_TEXT_CHARS = 100_000
MAX_MESSAGES = 512
MAX_NAME_CHARS = 256
MAX_STOPS = 16


def valid_unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\ud800"); no tokenizer can encode it: refuse it by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {exc.start}") from None
    return text


def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [] if value is None else [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    return stops


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(valid_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(valid_unicode)]
StopString = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(valid_unicode)]
# one stop string or a list of them, always a list once validated
Stops = Annotated[list[StopString] | StopString | None, AfterValidator(_stop_list),
                  Field(description="Stop strings (the text ends before them)")]


class StrictModel(BaseModel):
    # strict: no coercion from strings or booleans to numbers, nor from strings to booleans. JSON as Python
    # reads it allows NaN and Infinity: no number field of the API means either
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class ClosedModel(StrictModel):
    """A request body that refuses a field it does not define (400 naming it): never dropped silently."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", populate_by_name=True)


def sampling_params(body: BaseModel, max_tokens: int, *, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, choice: int = 0) -> SamplingParams:
    """The engine's sampling parameters of a request body: the fields it has, the engine's defaults for
    the rest (OpenAI's temperature default, 1.0, where the body leaves it unset). With a seed, choice i of n
    draws from seed + i."""
    def field(name, default):
        value = getattr(body, name, None)
        return default if value is None else value

    seed = getattr(body, "seed", None)
    logit_bias = field("logit_bias", {})
    return SamplingParams(
        max_tokens=max_tokens, temperature=field("temperature", 1.0), top_p=field("top_p", 1.0),
        top_k=max(field("top_k", 0), 0), min_p=field("min_p", 0.0),
        seed=None if seed is None else (seed + choice) % 2**63, stop=tuple(field("stop", ())),
        ignore_eos=bool(field("ignore_eos", False)), presence_penalty=field("presence_penalty", 0.0),
        frequency_penalty=field("frequency_penalty", 0.0), repetition_penalty=field("repetition_penalty", 1.0),
        logit_bias=tuple((int(k), v) for k, v in logit_bias.items()), logprobs=logprobs,
        prompt_logprobs=prompt_logprobs)
