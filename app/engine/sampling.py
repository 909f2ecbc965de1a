"""Turn logits into tokens: greedy rows in one argmax, sampled rows with their own seeded generator.

Numerically safe for every value the API accepts: a temperature below SAMPLING_EPS is greedy (see
SamplingParams.greedy), scores are shifted by their maximum before the softmax, and a row whose logits are
not finite fails that request alone (SamplingError), never the batch.

Per-request transforms (penalties, logit bias, min_p, a grammar's mask) and log-probabilities touch only
the rows that ask for them: a batch of plain requests takes the same two reductions it always did.
Log-probabilities are of the model's own logits, before any transform (as OpenAI and vLLM report them).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from app.engine.types import SamplingParams, TokenLogprob


class SamplingError(ValueError):
    """A row that cannot be sampled (its logits are not finite, or its grammar allows no token)."""


@dataclass
class RowState:
    """What the sampler needs of one sequence besides its logits."""

    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_ids: list[int] | None = None  # for the repetition penalty
    output_ids: list[int] | None = None  # for every penalty
    constraint: object | None = None  # app.engine.constraints.Constraint

    @property
    def special(self) -> bool:
        return self.constraint is not None or self.params.transforms_logits


@dataclass(frozen=True)
class Sampled:
    token: int
    logprob: TokenLogprob | None = None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def transform(scores: torch.Tensor, row: RowState) -> torch.Tensor:
    """A row's logits [V] (float32, a copy) with its penalties, bias and grammar mask applied."""
    p = row.params
    out_ids = row.output_ids or []
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(out_ids) | set(row.prompt_ids or ())), dtype=torch.long, device=scores.device)
        if seen.numel():
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and out_ids:
        ids, counts = torch.tensor(out_ids, device=scores.device).unique(return_counts=True)
        scores[ids] -= p.frequency_penalty * counts.to(scores.dtype) + p.presence_penalty
    for token, bias in p.logit_bias:
        if 0 <= token < scores.shape[-1]:
            scores[token] += bias
    if row.constraint is not None:
        row.constraint.mask(scores)
        if not torch.isfinite(scores.max()):
            raise SamplingError("the output's grammar allows no next token")
    return scores


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32), transforms already applied."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    scores = scores - scores.max()  # the top score is 0: exp cannot overflow
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.min_p > 0.0:  # the top score is 0, so a token's probability relative to the top is exp(score)
        scores = scores.masked_fill(scores < torch.log(torch.tensor(params.min_p)), float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop tokens once the mass before them already reaches top_p (the top token always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False  # explicitly: a top_p below float32's range (5e-324) rounds to 0 and would drop it
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """One position's entry: logprobs [V] (log-softmax of the raw logits)."""
    alternatives = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def sample(logits: torch.Tensor, rows: list[RowState]) -> list[Sampled | SamplingError]:
    """logits [B, V]; one token per row, or the SamplingError of a row that could not be sampled."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    # NaN and inf propagate through a sum: one reduction instead of a [B, V] mask
    finite = torch.isfinite(logits.float().sum(dim=-1)).tolist()
    out: list[Sampled | SamplingError] = []
    for i, row in enumerate(rows):
        p = row.params
        if not finite[i]:
            out.append(SamplingError("the model's output for this request is not finite (NaN or inf logits)"))
            continue
        try:
            scores = transform(logits[i].float().clone(), row) if row.special else logits[i]
            if p.greedy:
                token = greedy[i] if not row.special else int(torch.argmax(scores))
            else:
                token = sample_row(scores, p, row.generator)
            if row.constraint is not None and not row.constraint.accept(token):
                raise SamplingError(f"token {token} does not follow the output's grammar")
        except SamplingError as exc:
            out.append(exc)
            continue
        except RuntimeError as exc:  # e.g. multinomial refusing a degenerate distribution
            out.append(SamplingError(f"cannot sample this request's next token: {exc}"))
            continue
        logprob = None
        if p.logprobs is not None:
            logprob = token_logprobs(torch.log_softmax(logits[i].float(), dim=-1), token, p.logprobs)
        out.append(Sampled(token, logprob))
    return out
