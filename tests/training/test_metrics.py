import pytest

from training.metrics import class_f1, entity_f1


def test_class_f1_counts_only_the_positive_class():
    gold = ["spam", "ham", "spam", "ham", "ham"]
    pred = ["spam", "spam", "ham", "ham", "ham"]
    m = class_f1(gold, pred, "spam")
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["f1"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.6)
    assert class_f1(["ham"], ["ham"], "spam")["f1"] == 0.0  # no positives anywhere: 0, not a division error


def test_entity_f1_is_exact_match_on_label_and_span():
    gold = [[{"label": "person", "start": 0, "end": 5}, {"label": "geo-loc", "start": 10, "end": 15}]]
    pred = [[{"label": "person", "start": 0, "end": 5},  # exact: counts
             {"label": "company", "start": 10, "end": 15},  # wrong type
             {"label": "geo-loc", "start": 10, "end": 14}]]  # wrong span
    m = entity_f1(gold, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(0.5)
