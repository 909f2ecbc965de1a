"""Input encodings and output decodings of the classify and extract task types.

classify: the text's tokens, then an end-of-sequence marker; the prompt set's head reads the final
  hidden state (under causal attention it has seen the whole text) and scores the labels.
extract: the text twice, separated by the marker; a tagging head reads the hidden state of each word's
  first token in the second copy. A causal model's first copy sees only left context, the second copy
  sees the whole sentence, which entity types need ("Paris Hilton" vs "Paris"). Tags are BIO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TEXT_TOKENS = 256  # what a classify or extract task reads of a text (training cuts longer ones here)
_WORD = re.compile(r"\S+")


class TextTooLong(ValueError):
    """Serving refuses a text longer than a task reads, rather than answering about a part of it."""

    def __init__(self, tokens: int):
        super().__init__(f"the text has {tokens} tokens; a classify or extract task reads at most {MAX_TEXT_TOKENS}")
        self.tokens = tokens


def _cut(ids: list, refuse_longer: bool) -> list:
    if len(ids) > MAX_TEXT_TOKENS and refuse_longer:
        raise TextTooLong(len(ids))
    return ids[:MAX_TEXT_TOKENS]


def separator_id(tokenizer) -> int:
    return int(tokenizer.eos_token_id)


def classify_ids(tokenizer, text: str, refuse_longer: bool = False) -> list[int]:
    ids = _cut(tokenizer.encode(text, add_special_tokens=False), refuse_longer)
    return ids + [separator_id(tokenizer)]


def bio_tags(entity_types: list[str] | tuple[str, ...]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in entity_types for p in ("B", "I")]


def words_of(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass
class ExtractEncoding:
    ids: list[int]
    words: list[tuple[int, int]]  # character span of every word of the text
    positions: list[int]  # index in ids of each tagged word's first token (second copy)
    tagged_words: list[int]  # which words are tagged (a word cut off by truncation is not)


def extract_encoding(tokenizer, text: str, refuse_longer: bool = False) -> ExtractEncoding:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = _cut(list(enc["input_ids"]), refuse_longer)
    offsets = list(enc["offset_mapping"])[:MAX_TEXT_TOKENS]
    words = words_of(text)
    base = len(ids) + 1
    positions, tagged = [], []
    j = 0
    for w, (start, end) in enumerate(words):
        # the first token overlapping the word (byte-level BPE tokens may carry the space before it)
        while j < len(offsets) and offsets[j][1] <= start:
            j += 1
        if j >= len(offsets) or offsets[j][0] >= end:
            continue
        positions.append(base + j)
        tagged.append(w)
    return ExtractEncoding(ids + [separator_id(tokenizer)] + ids, words, positions, tagged)


def best_bio_path(logprobs: list[list[float]], tags: list[str]) -> list[int]:
    """The tag sequence of highest total log-probability that is valid BIO: I-X only right after B-X or I-X
    (Viterbi over the head's per-word scores). Per-word argmax can emit "O I-person" or "B-loc I-person",
    which a lenient reader turns into wrong spans; this never does, and where the argmax sequence is
    valid it is the answer (it is then the unconstrained maximum)."""
    if not logprobs:
        return []
    inside_of = {j: tags.index("B-" + tag[2:]) for j, tag in enumerate(tags) if tag.startswith("I-")}
    n_tags = len(tags)
    score = [lp if j not in inside_of else float("-inf") for j, lp in enumerate(logprobs[0])]  # no I- first
    back: list[list[int]] = []
    for row in logprobs[1:]:
        best_prev = max(range(n_tags), key=score.__getitem__)
        step, new = [], []
        for j in range(n_tags):
            if j in inside_of:  # I-X continues B-X or I-X
                b = inside_of[j]
                prev = b if score[b] >= score[j] else j
            else:
                prev = best_prev
            step.append(prev)
            new.append(score[prev] + row[j])
        back.append(step)
        score = new
    path = [max(range(n_tags), key=score.__getitem__)]
    for step in reversed(back):
        path.append(step[path[-1]])
    return path[::-1]


def decode_entities(text: str, enc: ExtractEncoding, tag_ids: list[int], tags: list[str]) -> list[dict]:
    """BIO tags per tagged word -> entities with character offsets into text.

    Lenient like the usual seqeval-style readers: an I- tag that does not continue an entity of its type
    starts one, so any tag sequence decodes to well-formed spans.
    """
    entities: list[dict] = []
    current: dict | None = None
    for w, tag_id in zip(enc.tagged_words, tag_ids):
        tag = tags[tag_id] if 0 <= tag_id < len(tags) else "O"
        start, end = enc.words[w]
        prefix, _, label = tag.partition("-")
        if tag == "O":
            current = None
            continue
        if prefix == "I" and current is not None and current["label"] == label and current["_last"] == w - 1:
            current["end"], current["_last"] = end, w
            continue
        current = {"label": label, "start": start, "end": end, "_last": w}
        entities.append(current)
    return [{"text": text[e["start"]:e["end"]], "label": e["label"], "start": e["start"], "end": e["end"]}
            for e in entities]
