"""Turn logits into tokens: greedy rows in one argmax, sampled rows with their own seeded generator.

Numerically safe for every value the API accepts: a temperature below SAMPLING_EPS is greedy (see
SamplingParams.greedy), scores are shifted by their maximum before the
softmax, and a row whose logits are not finite fails that request alone (SamplingError), never the batch.
"""

from __future__ import annotations

import secrets

import torch

from app.engine.types import SamplingParams

class SamplingError(ValueError):
    """A row that cannot be sampled (its logits are not finite)."""


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [V] (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    scores = scores - scores.max()  # the top score is 0: exp cannot overflow
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
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


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | SamplingError]:
    """logits [B, V]; one token per row, or the SamplingError of a row that could not be sampled."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    # NaN and inf propagate through a sum: one reduction instead of a [B, V] mask
    finite = torch.isfinite(logits.float().sum(dim=-1)).tolist()
    out: list[int | SamplingError] = []
    for i, (g, p) in enumerate(zip(greedy, params)):
        if not finite[i]:
            out.append(SamplingError("the model's output for this request is not finite (NaN or inf logits)"))
        elif p.greedy:
            out.append(g)
        else:
            try:
                out.append(sample_row(logits[i], p, generators[i]))
            except RuntimeError as exc:  # e.g. multinomial refusing a degenerate distribution
                out.append(SamplingError(f"cannot sample this request's next token: {exc}"))
    return out
