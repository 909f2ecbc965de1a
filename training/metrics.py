"""Evaluation metrics: class F1 and exact-match entity F1."""

from __future__ import annotations


def prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def class_f1(gold: list[str], pred: list[str], positive: str) -> dict:
    """F1 of one class (spam): the metric for an imbalanced binary task, not accuracy."""
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred))
    out = prf(tp, fp, fn)
    out["accuracy"] = sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0
    return out


def entity_f1(gold: list[list[dict]], pred: list[list[dict]]) -> dict:
    """Exact-match entity F1: an entity counts only when its label, start and end all match."""
    tp = fp = fn = 0
    for g, p in zip(gold, pred):
        gs = {(e["label"], e["start"], e["end"]) for e in g}
        ps = {(e["label"], e["start"], e["end"]) for e in p}
        tp += len(gs & ps)
        fp += len(ps - gs)
        fn += len(gs - ps)
    return prf(tp, fp, fn)
