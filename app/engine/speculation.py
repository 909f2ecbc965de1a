"""Prompt-lookup drafting for speculative decoding (n-gram speculation, as vLLM's `ngram` method and
llama.cpp's lookup decoding): the tokens that followed the most recent earlier occurrence of a sequence's
last few tokens, in its own prompt and output, are proposed as its next tokens.

At one or two running sequences a decode step on CPU is bound by reading the weights once, so the model can
check a few proposed tokens in the same pass for little more than the cost of one; the runner keeps every
proposed token the model itself would have chosen (model_runner.py: it samples each position in turn and
stops at the first that differs), so the output is the same as without speculation. What this gains is how
often outputs repeat their inputs: an entity list copied from a sentence, a quoted passage, a JSON key.

The index is kept per sequence and extended as tokens are appended: a proposal costs a few dict lookups,
not a scan of the context.
"""

from __future__ import annotations

# n-gram sizes tried, longest first. A match of a single token proposes too often to pay for the checks: a
# replay of the bench's greedy outputs (bare model, 24 prompts) with this machine's cost of checking 1-3 more
# tokens (1.12-1.35x a step) estimated 1.18x for sizes 2-3 with up to 3 tokens, 1.15x for 1-3, 1.14x for 3
MIN_NGRAM = 2
MAX_NGRAM = 3


class NgramDrafter:
    """A sequence's tokens (prompt, then output) and, for each n-gram that has been followed by a token,
    where its most recent such occurrence ends."""

    def __init__(self, tokens: list[int], min_n: int = MIN_NGRAM, max_n: int = MAX_NGRAM):
        if not 1 <= min_n <= max_n:
            raise ValueError("n-gram sizes must satisfy 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # (n-gram) -> the index just past its latest occurrence that has a token after it
        self._follows: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending here are now followed by `token`
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._follows[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching tail."""
        if k <= 0:
            return []
        end = len(self.tokens)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._follows.get(tuple(self.tokens[end - n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []
