"""Train the three demo tasks as `input` and `deep` prompt sets, plus the full fine-tuning reference,
and evaluate each on its dev split in-process. Writes prompt sets and results.json to OUT_DIR.

    python scripts/train_demo_tasks.py OUT_DIR [--tasks spam,ner,chat] [--model CHECKPOINT_OR_GGUF]

Runs on CPU or GPU unchanged (on this 2-core CPU it takes hours; on one GPU minutes). The HTTP figures in
the README come from `promptserve eval` against a server holding the exported prompt sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.model.loader import load_checkpoint  # noqa: E402
from app.model.source import resolve_checkpoint  # noqa: E402
from training.data import read_jsonl  # noqa: E402
from training.evaluate import answer_loss, eval_module, persona_questions, persona_rate  # noqa: E402
from training.presets import PRESETS  # noqa: E402
from training.prompt_module import PromptModule  # noqa: E402
from training.run import config_for, demo_rows, run_training  # noqa: E402


@torch.no_grad()
def persona_answers(model, tokenizer, device) -> dict:
    out = {}
    for q in persona_questions():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        out[q] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return {"persona_rate": persona_rate(list(out.values())), "persona_answers": out}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--tasks", default="spam,ner,chat")
    ap.add_argument("--kinds", default="input,deep,full")
    ap.add_argument("--model", default="")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "promptserve"))
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    checkpoint, base_name = resolve_checkpoint(args.model, Path(args.cache_dir))
    results = []
    results_path = out / "results.json"
    for name in args.tasks.split(","):
        if name == "chat":  # the base model's own held-out loss and persona rate, for comparison
            model, tok = load_checkpoint(checkpoint, device, dtype)
            from app.model.forward import DecoderForward
            from app.model.spec import model_spec
            bare = PromptModule(DecoderForward(model), model_spec(model, base_name), None, 0)
            rows = read_jsonl(PRESETS["chat"]["dev"], args.limit)
            results.append({"task": "chat", "kind": "base (zero-shot)", "dev_answer_loss":
                            answer_loss(bare, tok, rows, device), **persona_answers(model, tok, device)})
        for kind in args.kinds.split(","):
            k = None if kind == "full" else kind
            t0 = time.time()
            try:
                row = train_and_eval(checkpoint, base_name, name, kind, k, out, device, dtype, args.limit, t0)
            except Exception as exc:  # one failed run must not lose the others' results
                row = {"task": name, "kind": kind, "error": repr(exc)}
            results.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "persona_answers"}), flush=True)
            results_path.write_text(json.dumps(results, indent=2))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


def train_and_eval(checkpoint, base_name, name, kind, k, out, device, dtype, limit, t0) -> dict:
    res = run_training(checkpoint, name, out / f"{name}-{kind}.safetensors", k, demo_rows(name, limit),
                       config_for(name, k), device, dtype, base_name, PRESETS[name]["description"], progress=False)
    with torch.autocast(device.type, dtype=dtype, enabled=k is None):
        figures = eval_module(res["module"], res["tokenizer"], name, device, limit)
    if name == "chat" and k is None:
        figures.update(persona_answers(res["model"], res["tokenizer"], device))
    return {**res["stats"], **figures, "fingerprint": res["spec"].fingerprint,
            "wall_seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
