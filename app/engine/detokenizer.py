"""Incremental detokenization with stop strings.

Each step decodes only a short window of the newest tokens (vLLM's scheme): the text of
ids[prefix:read] is known, ids[prefix:] is decoded, and the difference is the new text. Starting the
window a few tokens back keeps merges across token boundaries right (a leading space, a character split
over byte tokens); a window that ends in an incomplete character waits for its next token. Each step costs
the same whatever the length of the output, where re-decoding every id made a long answer quadratic.

Text that could still be the start of a stop string is held back; a completed stop string ends the text
before it.
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
    _prefix: int = 0  # the window's start in _ids
    _read: int = 0  # _ids[:_read] are in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        known = self._decode(self._ids[self._prefix:self._read])
        window = self._decode(self._ids[self._prefix:])
        if len(window) > len(known) and (final or not window.endswith("\ufffd")):
            self.text += window[len(known):]
            # the next window starts where this one's new text started, a few tokens of context behind
            self._prefix, self._read = self._read, len(self._ids)

    def step(self, new_ids: list[int], final: bool = False) -> str:
        """Feed new token ids; returns the text that may now be sent."""
        if self.stopped:
            return ""
        self._ids.extend(i for i in new_ids if i not in self.skip_token_ids)
        self._advance(final)
        for s in self.stop:
            idx = self.text.find(s, max(0, self.sent - len(s)))
            if idx != -1:
                self.text = self.text[:idx]
                self.stopped = True
        end = len(self.text)
        if not (self.stopped or final):
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end = min(end, len(self.text[:end]) - k)
                        break
        end = max(end, self.sent)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
