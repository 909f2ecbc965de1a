"""OpenAI response pieces built from engine results: log-probabilities in the chat and the completions
shapes. Token texts come from the task service (the tokenizer); nothing here touches tensors."""

from __future__ import annotations

from typing import Callable

from app.engine.types import TokenLogprob

TokenText = Callable[[int], str]


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> list[dict]:
    """Chat: one object per token, its top alternatives as a list."""
    def item(token_id: int, logprob: float) -> dict:
        token = text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


def completion_logprobs(tokens: list[tuple[int, TokenLogprob | None]], text: TokenText, offset: int = 0) -> dict:
    """Completions (the legacy shape): parallel lists over (token id, its entry); the top alternatives as
    {token: logprob}. A token without an entry (the first prompt token, echoed) has null there."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in tokens:
        token = text(token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else {text(t): lp for t, lp in entry.top})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def prompt_entries(prompt_ids: list[int], prompt_logprobs: list[TokenLogprob | None] | None
                   ) -> list[tuple[int, TokenLogprob | None]]:
    padded = list(prompt_logprobs or []) + [None] * len(prompt_ids)
    return list(zip(prompt_ids, padded))


def output_entries(entries: list[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return [(e.token_id, e) for e in entries]
