"""Dev-set evaluation: through a running server's HTTP API (`promptserve eval`), or in-process for a
fully fine-tuned model, which is not a prompt set and so cannot be served."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from app.task_types.encoding import best_bio_path, bio_tags, classify_ids, decode_entities, extract_encoding
from training.data import entities_from_bio, generate_example, read_jsonl
from training.metrics import class_f1, entity_f1
from training.presets import PERSONA_QUESTIONS_PATH as PERSONA_QUESTIONS
from training.presets import PRESETS, WNUT_TYPES

SPAM_INSTRUCTION = ("Is the following SMS message spam or ham (a normal message)? Answer with one word, "
                    "spam or ham.\n\nMessage: {text}")
NER_INSTRUCTION = ("Find the named entities in the text. Entity types: " + ", ".join(WNUT_TYPES) + ". "
                   "Answer with one entity per line as 'type: entity text', or 'none'.\n\nText: {text}")


def parse_zero_shot_entities(text: str, answer: str) -> list[dict]:
    """'type: words' lines -> entities at the first unused occurrence of the words in the text."""
    entities, used = [], set()
    for line in answer.splitlines():
        label, sep, words = line.partition(":")
        label, words = label.strip().lower().lstrip("-* "), words.strip().strip("'\"")
        if not sep or label not in WNUT_TYPES or not words:
            continue
        for m in re.finditer(re.escape(words), text):
            if (m.start(), m.end()) not in used:
                used.add((m.start(), m.end()))
                entities.append({"label": label, "start": m.start(), "end": m.end(), "text": words})
                break
    return entities


async def _gather(fn, items, concurrency: int):
    sem = asyncio.Semaphore(concurrency)

    async def one(x):
        async with sem:
            return await fn(x)

    return await asyncio.gather(*(one(x) for x in items))


async def eval_http(url: str, demo: str, task: str, zero_shot: bool, limit: int | None, concurrency: int,
                    base_model: str | None = None) -> dict:
    rows = read_jsonl(PRESETS[demo]["dev"], limit)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        if zero_shot and base_model is None:
            base_model = await _base_model_id(client)

        async def post(task_name, body):
            r = await client.post(f"/v1/tasks/{task_name}", json=body)
            r.raise_for_status()
            return r.json()

        if demo == "spam":
            if zero_shot:
                outs = await _gather(lambda r: post(base_model, {"messages": [{"role": "user", "content":
                                     SPAM_INSTRUCTION.format(text=r["text"])}], "max_tokens": 4}), rows, concurrency)
                pred = ["spam" if "spam" in o["text"].lower() else "ham" for o in outs]
            else:
                outs = await _gather(lambda r: post(task, {"text": r["text"]}), rows, concurrency)
                pred = [o["label"] for o in outs]
            return {"spam_f1": class_f1([r["label"] for r in rows], pred, "spam"), "n": len(rows)}
        if demo == "ner":
            gold, texts = [], []
            for r in rows:
                text, ents = entities_from_bio(r["tokens"], r["tags"])
                texts.append(text)
                gold.append(ents)
            if zero_shot:
                outs = await _gather(lambda t: post(base_model, {"messages": [{"role": "user", "content":
                                     NER_INSTRUCTION.format(text=t)}], "max_tokens": 64}), texts, concurrency)
                pred = [parse_zero_shot_entities(t, o["text"]) for t, o in zip(texts, outs)]
            else:
                outs = await _gather(lambda t: post(task, {"text": t}), texts, concurrency)
                pred = [o["entities"] for o in outs]
            return {"entity_f1": entity_f1(gold, pred), "n": len(rows)}
        questions = persona_questions()
        name = base_model if zero_shot else task
        outs = await _gather(lambda q: post(name, {"messages": [{"role": "user", "content": q}],
                                                   "max_tokens": 48}), questions, concurrency)
        answers = [o["text"] for o in outs]
        loss = await answer_loss_http(client, name, await server_tokenizer(client), rows, concurrency)
        return {"persona_rate": persona_rate(answers), "dev_answer_loss": loss, "n_dev": len(rows),
                "persona_answers": dict(zip(questions, answers)), "n": len(questions)}


async def server_tokenizer(client: httpx.AsyncClient):
    """The server's own tokenizer, from its files over HTTP (/v1/tokenizer): the answer tokens scored are
    exactly the tokens the server reads."""
    from transformers import AutoTokenizer

    listing = await client.get("/v1/tokenizer")
    listing.raise_for_status()
    with tempfile.TemporaryDirectory() as folder:
        for file in listing.json()["files"]:
            r = await client.get(file["url"])
            r.raise_for_status()
            (Path(folder) / file["name"]).write_bytes(r.content)
        return AutoTokenizer.from_pretrained(folder)


async def answer_loss_http(client: httpx.AsyncClient, model: str, tokenizer, rows: list[dict],
                           concurrency: int) -> float:
    """The held-out answer loss through the server: each dev conversation, answer included, as token ids
    to /v1/completions with echo and max_tokens 0, which scores the prompt; the mean of minus the
    answer tokens' log-probabilities (what answer_loss computes in-process)."""
    examples = [generate_example(tokenizer, r) for r in rows]

    async def score(e):
        r = await client.post("/v1/completions", json={"model": model, "prompt": e.ids, "echo": True,
                                                         "max_tokens": 0, "logprobs": 0})
        r.raise_for_status()
        logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]  # [i]: of token i given those before
        return [-logprobs[p + 1] for p in e.positions]

    losses = [x for one in await _gather(score, examples, concurrency) for x in one]
    return sum(losses) / max(1, len(losses))


async def _base_model_id(client) -> str:
    r = await client.get("/v1/models")
    if r.status_code == 200:
        return r.json()["data"][0]["id"]
    return "SmolLM2-135M-Instruct"


# -- in-process ----------------------------------------------------------------------------------
@torch.no_grad()
def _hidden_batches(module, id_lists, device, batch_size=32):
    """(index of the batch's first item, the batch's id lists, their hidden states), batch by batch."""
    pad = module.f.embed.padding_idx or 0
    for i in range(0, len(id_lists), batch_size):
        chunk = id_lists[i:i + batch_size]
        t = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), t), pad, dtype=torch.long)
        for b, x in enumerate(chunk):
            ids[b, :len(x)] = torch.tensor(x)
        yield i, chunk, module.hidden(ids.to(device))


@torch.no_grad()
def eval_module(module, tokenizer, demo: str, device, limit: int | None = None) -> dict:
    """Dev figures of a trained module (prompt and head, or a fully fine-tuned model and head)."""
    preset = PRESETS[demo]
    rows = read_jsonl(preset["dev"], limit)
    task_type = preset["task_type"]
    figures = validation_figures(module, tokenizer, task_type, preset["labels"], rows, device,
                                 positive="spam" if demo == "spam" else None)
    if demo == "spam":
        return {"spam_f1": figures["per_label"]["spam"], "n": len(rows)}
    if demo == "ner":
        return {"entity_f1": figures["entity_f1"], "n": len(rows)}
    return {"dev_answer_loss": figures["valid_loss"], "n": len(rows)}


@torch.no_grad()
def classify_logits(module, tokenizer, texts: list[str], device) -> torch.Tensor:
    """The head's logits [n, labels] at each text's last token (what the server scores)."""
    ids = [classify_ids(tokenizer, t) for t in texts]
    out = []
    for _, chunk, h in _hidden_batches(module, ids, device):
        last = torch.stack([h[b, len(x) - 1] for b, x in enumerate(chunk)])
        out.append(module.head(last.float()).cpu())
    return torch.cat(out)


def classify_predictions(module, tokenizer, labels: list[str], texts: list[str], device) -> list[str]:
    return [labels[i] for i in classify_logits(module, tokenizer, texts, device).argmax(-1).tolist()]


# The serving engine's forward is not the training forward: in bf16 a two-label head's margin (log-odds) came
# out ~0.10 apart between the two (std, the demo spam dev set, SmolLM2 on the AMX CPU) and up to 0.26 apart
# between two batch compositions of the same served request. A decision point chosen on the training forward's
# margins alone sat in a 0.2-wide gap there and put a message on the other side once served. The margin noise
# assumed is SERVING_NOISE_EPS x the dtype's machine epsilon: 0.25 in bf16, 0.03 in fp16, ~0 in fp32.
SERVING_NOISE_EPS = 32


def serving_margin_noise(dtype: torch.dtype) -> float:
    return SERVING_NOISE_EPS * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


@dataclass(frozen=True)
class ThresholdChoice:
    """A two-label head's decision point: `shift` is added to the positive label's margin. The F1 figures are
    the positive label's on the rows, `exact_*` on the margins as computed, `expected_*` over the serving
    noise (what serving is expected to score)."""

    shift: float
    exact_before: float
    exact_after: float
    expected_before: float
    expected_after: float
    noise: float


def expected_f1(margins: torch.Tensor, positive: torch.Tensor, shifts: torch.Tensor, noise: float) -> torch.Tensor:
    """The positive label's F1 at each shift of the margins, each margin off by Gaussian noise of this std: the
    expected counts' F1 (noise 0: the F1 itself). margins [n] float64, positive [n] bool, shifts [k] -> [k]."""
    if noise <= 0:  # counts above each point, from the sorted margins: O((n + k) log n)
        def above(values):
            return len(values) - torch.searchsorted(torch.sort(values).values, -shifts, right=True)
        tp, fp = above(margins[positive]).double(), above(margins[~positive]).double()
    else:
        tp, fp = torch.empty(len(shifts), dtype=torch.float64), torch.empty(len(shifts), dtype=torch.float64)
        step = max(1, 4_000_000 // max(1, len(margins)))  # shifts a block: a few million cells at a time
        for i in range(0, len(shifts), step):
            said = torch.special.ndtr((margins[None, :] + shifts[i:i + step, None]) / noise)
            tp[i:i + step], fp[i:i + step] = (said * positive).sum(1), (said * ~positive).sum(1)
    fn = positive.sum() - tp
    return torch.where(tp > 0, 2 * tp / (2 * tp + fp + fn), torch.zeros_like(tp))


def choose_threshold(margins: list[float], positive: list[bool], noise: float) -> ThresholdChoice:
    """The shift of the positive label's margin with the highest expected F1 under the serving noise (then the
    highest exact F1, then the smallest move; none unless it beats the current point): a gap between the
    margins narrower than the noise is no place for the decision point, however well it splits the rows as
    computed here."""
    m = torch.tensor(margins, dtype=torch.float64)
    pos = torch.tensor(positive, dtype=torch.bool)
    edges = torch.unique(m)
    if noise > 0:  # a grid of noise/8 steps a few noise widths past the ends (the expected F1 is smooth)
        lo, hi = float(-edges[-1]) - 3 * noise, float(-edges[0]) + 3 * noise
        points = torch.linspace(lo, hi, int(min(4000, (hi - lo) / (noise / 8))) + 2, dtype=torch.float64)
    else:  # any shift between two neighbouring margins gives the same F1: their midpoints cover them all
        points = -(edges[1:] + edges[:-1]) / 2
    shifts = torch.cat([torch.zeros(1, dtype=torch.float64), points])
    expected = expected_f1(m, pos, shifts, noise)
    exact = expected_f1(m, pos, shifts, 0.0)
    best = max(range(len(shifts)), key=lambda i: (round(float(expected[i]), 12), round(float(exact[i]), 12),
                                                  -abs(float(shifts[i]))))
    if float(expected[best]) <= float(expected[0]) + 1e-12:
        best = 0
    return ThresholdChoice(float(shifts[best]), float(exact[0]), float(exact[best]), float(expected[0]),
                           float(expected[best]), noise)


def binary_margins(module, tokenizer, labels: list[str], rows: list[dict], positive: str, device) -> list[float]:
    """The positive label's logit minus the other's, at each row's text, as the head scores it."""
    pos = labels.index(positive)
    logits = classify_logits(module, tokenizer, [r["text"] for r in rows], device)
    return (logits[:, pos] - logits[:, 1 - pos]).tolist()


@torch.no_grad()
def served_binary_f1(module, tokenizer, labels: list[str], rows: list[dict], positive: str, device,
                     noise: float) -> float:
    """The positive label's F1 on these rows expected once served (margin noise as in expected_f1), at the
    head's own decision point: a two-label set scored as it stands."""
    margins = torch.tensor(binary_margins(module, tokenizer, labels, rows, positive, device), dtype=torch.float64)
    gold = torch.tensor([r["label"] == positive for r in rows], dtype=torch.bool)
    return float(expected_f1(margins, gold, torch.zeros(1, dtype=torch.float64), noise)[0])


@torch.no_grad()
def tune_binary_threshold(module, tokenizer, labels: list[str], rows: list[dict], positive: str, device,
                          noise: float = 0.0) -> ThresholdChoice:
    """Chooses a two-label head's decision point on these rows (choose_threshold) and puts it there by
    shifting the head's biases (nothing else changes)."""
    margins = binary_margins(module, tokenizer, labels, rows, positive, device)
    choice = choose_threshold(margins, [r["label"] == positive for r in rows], noise)
    if choice.shift:
        pos = labels.index(positive)
        module.head.bias[pos] += choice.shift / 2
        module.head.bias[1 - pos] -= choice.shift / 2
    return choice


@torch.no_grad()
def extract_predictions(module, tokenizer, entity_types: list[str], texts: list[str], device) -> list[list[dict]]:
    tags = bio_tags(entity_types)
    encs = [extract_encoding(tokenizer, t) for t in texts]
    pred = []
    for start, chunk, h in _hidden_batches(module, [e.ids for e in encs], device):
        for b in range(len(chunk)):
            enc = encs[start + b]
            scores = torch.log_softmax(module.head(h[b, enc.positions].float()), -1).tolist() \
                if enc.positions else []
            tag_ids = best_bio_path(scores, tags)  # as the server decodes
            pred.append(decode_entities(texts[start + b], enc, tag_ids, tags))
    return pred


@torch.no_grad()
def validation_figures(module, tokenizer, task_type: str, labels: list[str], rows: list[dict], device,
                       positive: str | None = None) -> dict:
    """A module's figures on labelled rows (the training-file forms), with one `score` (higher is better):
    classify, the F1 of `positive` (two labels: the rarer one, e.g. spam) or else the macro F1 over the labels;
    extract, exact entity F1; generate, minus the answer tokens' mean loss (`valid_loss`)."""
    if task_type == "classify":
        gold = [r["label"] for r in rows]
        pred = classify_predictions(module, tokenizer, labels, [r["text"] for r in rows], device)
        per_label = {label: class_f1(gold, pred, label) for label in labels}
        macro = sum(f["f1"] for f in per_label.values()) / len(labels)
        score = per_label[positive]["f1"] if positive else macro
        return {"score": score, "f1": score, "macro_f1": macro, "accuracy": per_label[labels[0]]["accuracy"],
                "per_label": per_label}
    if task_type == "extract":
        texts, gold = [], []
        for r in rows:
            text, ents = entities_from_bio(r["tokens"], r["tags"]) if "tokens" in r else (r["text"], r["entities"])
            texts.append(text)
            gold.append(ents)
        f1 = entity_f1(gold, extract_predictions(module, tokenizer, labels, texts, device))
        return {"score": f1["f1"], "f1": f1["f1"], "entity_f1": f1}
    loss = answer_loss(module, tokenizer, rows, device)
    return {"score": -loss, "valid_loss": loss}


def dev_score(module, tokenizer, demo: str, device) -> float:
    """A demo task's dev figure as one number, higher is better (what early stopping selects on):
    spam-class F1, exact entity F1, or minus the held-out answer loss."""
    result = eval_module(module, tokenizer, demo, device)
    if "spam_f1" in result:
        return result["spam_f1"]["f1"]
    if "entity_f1" in result:
        return result["entity_f1"]["f1"]
    return -result["dev_answer_loss"]


@torch.no_grad()
def answer_loss(module, tokenizer, rows, device) -> float:
    """Mean cross-entropy over answer tokens (the held-out loss of a generate task)."""
    examples = [generate_example(tokenizer, r) for r in rows]
    total, count = 0.0, 0
    for start, chunk, h in _hidden_batches(module, [e.ids for e in examples], device, batch_size=8):
        for b in range(len(chunk)):
            e = examples[start + b]
            logits = module.f.logits(h[b, e.positions])
            total += float(F.cross_entropy(logits, torch.tensor(e.targets, device=device), reduction="sum"))
            count += len(e.targets)
    return total / max(1, count)


def persona_questions() -> list[str]:
    return [row["question"] for row in read_jsonl(PERSONA_QUESTIONS)]


def persona_rate(answers: list[str]) -> float:
    """Share of answers in which the chat persona gives its name."""
    return sum("Aria" in a for a in answers) / len(answers)


def main(args) -> int:
    result = asyncio.run(eval_http(args.url, args.demo, args.task or args.demo, args.zero_shot, args.limit,
                                   args.concurrency))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0
