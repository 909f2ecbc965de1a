"""Incremental detokenization with stop strings.

Text is decoded from all generated tokens each step and diffed against what was already sent, so
tokens that merge across boundaries (multi-byte characters, leading spaces) come out right. Text that
could still be the start of a stop string, or that ends in an incomplete character, is held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Detokenizer:
    tokenizer: object
    stop: tuple[str, ...] = ()
    skip_token_ids: frozenset[int] = frozenset()
    sent: int = 0  # characters of text already emitted
    text: str = ""
    stopped: bool = False
    _ids: list[int] = field(default_factory=list)

    def step(self, new_ids: list[int], final: bool = False) -> str:
        """Feed new token ids; returns the text that may now be sent."""
        if self.stopped:
            return ""
        self._ids.extend(i for i in new_ids if i not in self.skip_token_ids)
        self.text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        for s in self.stop:
            idx = self.text.find(s, max(0, self.sent - len(s)))
            if idx != -1:
                self.text = self.text[:idx]
                self.stopped = True
        if self.stopped or final:  # the text was already cut at the stop string
            end = len(self.text)
        else:
            end = len(self.text)
            if self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                end -= 1
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end = min(end, len(self.text[:end]) - k)
                        break
        end = max(end, self.sent)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
