"""Plain data passed between the caller, the scheduler and the model runner."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the grammar engine's matcher; types.py stays importable without it
    from app.engine.constraints import Constraint
    from app.engine.prompt_cache import CachedPrompt


# Below this temperature, scaling can only change the result by rounding: the request is greedy (vLLM draws
# the same line). Dividing logits by 1e-40 made them infinite and the softmax NaN.
SAMPLING_EPS = 1e-5


MAX_LOGPROBS = 20  # top alternatives per token a request may ask for (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # 0: prefill only (with prompt_logprobs: score the prompt)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # penalties on tokens already generated (presence, frequency: OpenAI's; repetition: prompt and output,
    # divides positive logits and multiplies negative ones, as transformers and vLLM do)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # log-probabilities of the model's own logits (before any of the transforms above): None = not asked;
    # N = the chosen token's and the N most likely alternatives'
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def ends_on(self, token: int, length: int, stop_token_ids: frozenset[int]) -> FinishReason | None:
        """Why a sequence with these parameters ends on `token`, its output then `length` tokens long (a stop
        token unless ignore_eos, else max_tokens), or None: the scheduler finishes it for this reason, and a
        speculative check samples nothing after such a token."""
        if not self.ignore_eos and token in stop_token_ids:
            return FinishReason.STOP
        if length >= self.max_tokens:
            return FinishReason.LENGTH
        return None

    @property
    def transforms_logits(self) -> bool:
        """Whether this request changes the logits before choosing (else the batch's plain path serves it)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_p > 0.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model, with the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptSetRef:
    """Which stored prompt-set version a request runs with (resolved when the request is made, so a
    running request keeps its version even if another is activated meanwhile). Its identity is the
    content hash: caches key on it, and bytes read from `path` are checked against it."""

    task: str
    version: int
    path: str
    num_virtual_tokens: int
    sha256: str

    @property
    def key(self) -> str:
        return self.sha256


class Mode(enum.StrEnum):
    """What a request asks of the model. generate: sample tokens. classify: the prompt set's head scores the
    final position. tag: the head tags tag_positions. The last two are one forward pass and finish at once."""

    GENERATE = "generate"
    CLASSIFY = "classify"
    TAG = "tag"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token or string, a complete grammar, or a head request's answer
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # the caller left
    ERROR = "error"


@dataclass(frozen=True)
class EngineRequest:
    """What a caller asks of the engine, as one typed object from the service down (the engine gives it an
    id and tracks it as a GenerationRequest)."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt_set: PromptSetRef | None = None
    mode: Mode = Mode.GENERATE
    tag_positions: list[int] | None = None
    # a grammar the output must follow (app/engine/constraints.py): one matcher per request, its own state
    constraint: Constraint | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt_set: PromptSetRef | None = None
    mode: Mode = Mode.GENERATE  # see Mode
    tag_positions: list[int] | None = None
    constraint: Constraint | None = None  # see EngineRequest

    @property
    def prefix_len(self) -> int:
        return self.prompt_set.num_virtual_tokens if self.prompt_set else 0

    @property
    def prompt_set_key(self) -> str | None:
        """The identity of what precedes the prompt (its prompt set's content hash; None: the bare model)."""
        return self.prompt_set.key if self.prompt_set else None


class ErrorKind(enum.StrEnum):
    """Why a request failed in the engine; the caller maps it to its own status codes."""

    INVALID = "invalid"  # the request itself cannot be run (its numbers, its prompt set's contents)
    GRAMMAR = "grammar"  # its output's grammar broke a limit of the grammar engine while being followed
    UNAVAILABLE = "unavailable"  # something it names went away meanwhile (its prompt-set version): retry
    INTERNAL = "internal"  # the engine failed on it


@dataclass(frozen=True)
class EngineError:
    message: str
    kind: str = ErrorKind.INTERNAL


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Scheduler-side state of one request."""

    request: GenerationRequest
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    result: dict | None = None  # classify/tag output
    # Prompt tokens whose keys and values are in the cache, and how many of the rest this step prefills
    # (vLLM's num_computed_tokens / num_scheduled_tokens): the scheduler sets the second, and adds it to the
    # first once the step ran. A prompt longer than a step's token budget takes several steps this way.
    num_computed_tokens: int = 0
    num_scheduled_tokens: int = 0
    # the beginning of the prompt found in the prompt cache (app/engine/prompt_cache.py) when it was admitted:
    # counted as computed, copied into the row by the step that starts it
    cached_prompt: CachedPrompt | None = None
    # tokens the last step appended to output_ids (several after a speculative check), set by the scheduler,
    # and the log-probabilities asked for: of those tokens (sent with them), and of the prompt's tokens
    # (filled chunk by chunk in prefill; the first prompt token has none)
    num_new_tokens: int = 0
    new_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def total_len(self) -> int:
        return self.request.prefix_len + len(self.request.prompt_token_ids) + len(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def reserved_len(self) -> int:
        """The cache positions this sequence may reach: its prefix, prompt and (generating) max_tokens."""
        generated = self.request.sampling.max_tokens if self.request.mode == Mode.GENERATE else 0
        return self.request.prefix_len + self.prompt_len + generated

    @property
    def prefill_range(self) -> tuple[int, int]:
        """The slice [start, end) of the prompt this step prefills."""
        return self.num_computed_tokens, self.num_computed_tokens + self.num_scheduled_tokens

    @property
    def starts_row(self) -> bool:
        """This step's prefill begins the sequence's cache row (no chunk of it ran before; tokens found in
        the prompt cache count as computed but are copied into the row by this same step)."""
        return self.num_computed_tokens == (self.cached_prompt.tokens if self.cached_prompt is not None else 0)

    @property
    def prefill_is_whole(self) -> bool:
        """This step prefills the whole prompt (not one chunk of a long one)."""
        return self.num_computed_tokens == 0 and self.num_scheduled_tokens == self.prompt_len

    @property
    def prefill_ends_prompt(self) -> bool:
        """After this step the whole prompt is in the cache: the sequence can sample its first token."""
        return self.num_computed_tokens + self.num_scheduled_tokens >= self.prompt_len


@dataclass
class SchedulerOutput:
    # to run their scheduled prompt tokens now, then sample those whose prefill ends the prompt
    prefills: list[Sequence] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)  # running: their next token (or tokens: speculation)
    aborted: list[Sequence] = field(default_factory=list)  # to free before the step

    @property
    def empty(self) -> bool:
        return not (self.prefills or self.decodes)


@dataclass
class RequestOutput:
    """One event for the caller: newly generated text, and the end of the request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    scores: list[float] | None = None  # classify: probability per label
    tag_logprobs: list[list[float]] | None = None  # tag: log-probability of each tag, per position
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked for
