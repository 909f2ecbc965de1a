"""Training examples for the three task types, from JSONL files.

Accepted rows:
  generate  {"instruction", "input"?, "output"} (Alpaca style) or {"messages": [...]} whose last message is
            the assistant's answer; the loss covers the answer tokens only.
  classify  {"text", "label"}
  extract   {"tokens", "tags"} (BIO per token; the text is the tokens joined by single spaces) or
            {"text", "entities": [{"label", "start", "end"}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.task_types.encoding import bio_tags, classify_ids, extract_encoding


@dataclass
class Example:
    ids: list[int]
    targets: list[int]  # generate: next-token labels per position (-100 = no loss); else head labels
    positions: list[int]  # positions whose hidden state the head (or LM loss) reads


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def chat_messages(row: dict) -> tuple[list[dict], str]:
    if "messages" in row:
        *context, last = row["messages"]
        return context, last["content"]
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}], row["output"]


def generate_example(tokenizer, row: dict, max_len: int = 512) -> Example:
    messages, answer = chat_messages(row)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_len]
    # position i predicts token i+1: only positions that predict an answer token carry loss
    positions = list(range(len(prompt_ids) - 1, len(ids) - 1))
    targets = [ids[i + 1] for i in positions]
    return Example(ids, targets, positions)


def classify_example(tokenizer, row: dict, labels: list[str]) -> Example:
    ids = classify_ids(tokenizer, row["text"])
    return Example(ids, [labels.index(row["label"])], [len(ids) - 1])


def entities_from_bio(tokens: list[str], tags: list[str]) -> tuple[str, list[dict]]:
    text = " ".join(tokens)
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t) + 1
    entities, current = [], None
    for i, (tok, tag) in enumerate(zip(tokens, tags)):
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current["label"] != tag[2:])):
            current = {"label": tag[2:], "start": starts[i], "end": starts[i] + len(tok)}
            entities.append(current)
        elif tag.startswith("I-"):
            current["end"] = starts[i] + len(tok)
        else:
            current = None
    return text, entities


def extract_example(tokenizer, row: dict, entity_types: list[str]) -> Example:
    if "tokens" in row:
        text, entities = entities_from_bio(row["tokens"], row["tags"])
    else:
        text, entities = row["text"], row["entities"]
    enc = extract_encoding(tokenizer, text)
    tags = bio_tags(entity_types)
    word_tag = ["O"] * len(enc.words)
    for e in entities:
        inside = [w for w, (s, t) in enumerate(enc.words) if s >= e["start"] and t <= e["end"]]
        for k, w in enumerate(inside):
            word_tag[w] = ("B-" if k == 0 else "I-") + e["label"]
    targets = [tags.index(word_tag[w]) for w in enc.tagged_words]
    return Example(enc.ids, targets, enc.positions)


def build_examples(tokenizer, rows: list[dict], task_type: str, labels: list[str]) -> list[Example]:
    if task_type == "generate":
        return [generate_example(tokenizer, r) for r in rows]
    if task_type == "classify":
        return [classify_example(tokenizer, r, labels) for r in rows]
    return [extract_example(tokenizer, r, labels) for r in rows]
