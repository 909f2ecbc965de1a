"""Training files checked line by line: the task type a file trains, and errors that name line and field."""

from __future__ import annotations

import json

import pytest

from fine_tuning.data_files import DataFileError, check_labels, parse_rows


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("rows, task_type, labels", [
    ([CHAT, CHAT], "generate", []),
    ([{"instruction": "say hi", "input": "", "output": "hi"}], "generate", []),
    ([{"text": "a", "label": "ham"}, {"text": "b", "label": "spam"}, {"text": "c", "label": "ham"}],
     "classify", ["ham", "spam"]),
    ([{"tokens": ["Paris", "is", "big"], "tags": ["B-geo-loc", "O", "O"]}], "extract", ["geo-loc"]),
    ([{"text": "Paris is big", "entities": [{"label": "geo-loc", "start": 0, "end": 5}]}], "extract", ["geo-loc"]),
])
def test_forms(rows, task_type, labels):
    parsed, summary = parse_rows(jsonl(*rows, ""), 100)
    assert (summary.task_type, summary.labels, summary.lines) == (task_type, labels, len(rows))
    assert parsed == rows


@pytest.mark.parametrize("lines, line, field", [
    (['{"text": "a", "label": "ham"}', '{"text": "b"'], 2, None),  # not JSON
    (['{"text": "a", "label": "ham"}', '[1, 2]'], 2, None),
    (['{"text": "a", "label": "ham"}', '{"text": "", "label": "ham"}'], 2, "text"),
    (['{"text": "a", "label": "ham", "weight": 2}'], 1, "weight"),
    (['{"text": "a", "label": "ham"}', json.dumps(CHAT)], 2, None),  # a second task type
    ([json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]})], 1,
     "messages.1.role"),
    ([json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})], 1,
     "messages.1.role"),
    ([json.dumps({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "x", "tool_calls": []}]})], 1,
     "messages.1.tool_calls"),
    ([json.dumps({"tokens": ["a", "b"], "tags": ["O"]})], 1, "tags"),
    ([json.dumps({"tokens": ["a", "b"], "tags": ["O", "X-y"]})], 1, "tags.1"),
    ([json.dumps({"text": "abc", "entities": [{"label": "x", "start": 2, "end": 9}]})], 1, "entities.0"),
    (['{"foo": 1}'], 1, None),
])
def test_an_error_names_the_line_and_field(lines, line, field):
    with pytest.raises(DataFileError) as err:
        parse_rows("\n".join(lines).encode(), 100)
    assert (err.value.line, err.value.field) == (line, field)
    assert str(err.value).startswith(f"line {line}")


def test_caps_and_encoding():
    with pytest.raises(DataFileError, match="more than 2 rows") as err:
        parse_rows(jsonl(*[{"text": "a", "label": "x"}] * 3), 2)
    assert err.value.line == 3
    with pytest.raises(DataFileError, match="UTF-8") as err:
        parse_rows(b'{"text": "a", "label": "x"}\n{"text": "\xff", "label": "x"}', 10)
    assert err.value.line == 2
    with pytest.raises(DataFileError, match="no rows"):
        parse_rows(b"\n\n", 10)


def test_labels_against_a_task():
    data = jsonl({"text": "a", "label": "ham"}, {"text": "b", "label": "junk"})
    check_labels(data, "classify", ["ham", "junk"], "training_file")
    with pytest.raises(DataFileError, match="'junk' is not one of the task's") as err:
        check_labels(data, "classify", ["ham", "spam"], "training_file")
    assert (err.value.line, err.value.field) == (2, "label")
