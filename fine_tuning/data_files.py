"""Training files, checked line by line: which task type their rows train, and an error that names the line
and the field when a row cannot train anything.

Accepted rows (one form per file):
  generate  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} ending with the
            assistant's answer (OpenAI's chat format), or {"instruction", "input"?, "output"}
  classify  {"text", "label"}
  extract   {"tokens": [...], "tags": [...]} (BIO tags, one per token; the demo NER format) or
            {"text", "entities": [{"label", "start", "end"}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
FORMS = {
    "messages": ("generate", {"messages"}, set()),
    "instruction": ("generate", {"instruction", "output"}, {"input"}),
    "label": ("classify", {"text", "label"}, set()),
    "bio": ("extract", {"tokens", "tags"}, set()),
    "entities": ("extract", {"text", "entities"}, set()),
}
MAX_FIELD_CHARS = 100_000


class DataFileError(ValueError):
    """A file that cannot train: `line` (1-based, 0 for the whole file) and `field` say where."""

    def __init__(self, message: str, line: int = 0, field: str | None = None):
        where = f"line {line}" + (f", field '{field}'" if field else "") if line else ""
        super().__init__(f"{where}: {message}" if where else message)
        self.line, self.field = line, field


@dataclass
class FileSummary:
    task_type: str
    form: str
    lines: int  # rows (blank lines are skipped)
    labels: list[str] = field(default_factory=list)  # classify: the labels, most frequent first; extract: types
    label_counts: dict[str, int] = field(default_factory=dict)


def _form_of(row: dict, line: int) -> str:
    keys = set(row)
    for name, (_, required, optional) in FORMS.items():
        if required <= keys:
            extra = keys - required - optional
            if extra:
                raise DataFileError(f"unknown field for a {FORMS[name][0]} row; fields: "
                                    f"{', '.join(sorted(required | optional))}", line, sorted(extra)[0])
            return name
    raise DataFileError("a row is {\"messages\": [...]} (generate), {\"text\", \"label\"} (classify), or "
                        "{\"tokens\", \"tags\"} / {\"text\", \"entities\"} (extract); got fields "
                        f"{sorted(keys) or 'none'}", line)


def _string(row: dict, key: str, line: int, where: str | None = None, empty_ok: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise DataFileError("must be a non-empty string", line, where or key)
    if len(value) > MAX_FIELD_CHARS:
        raise DataFileError(f"longer than {MAX_FIELD_CHARS} characters", line, where or key)
    return value


def _check_messages(row: dict, line: int) -> None:
    messages = row["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataFileError("must be a list of at least two messages, the last the assistant's answer", line,
                            "messages")
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise DataFileError("must be an object with role and content", line, where)
        extra = set(m) - {"role", "content"}
        if extra:
            raise DataFileError("only role and content are read (no tool calls, names or weights)", line,
                                f"{where}.{sorted(extra)[0]}")
        if m.get("role") not in ROLES:
            raise DataFileError(f"role must be one of {', '.join(ROLES)}", line, f"{where}.role")
        _string(m, "content", line, f"{where}.content", empty_ok=m["role"] != "assistant")
    if messages[-1]["role"] != "assistant":
        raise DataFileError("the last message must be the assistant's answer (what the task learns)", line,
                            f"messages.{len(messages) - 1}.role")


def _check_bio(row: dict, line: int) -> set[str]:
    tokens, tags = row["tokens"], row["tags"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise DataFileError("must be a non-empty list of non-empty strings", line, "tokens")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise DataFileError(f"must be a list of one tag per token ({len(tokens)})", line, "tags")
    types = set()
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        if not isinstance(tag, str) or tag[:2] not in ("B-", "I-") or not tag[2:]:
            raise DataFileError("a tag is O, B-<type> or I-<type>", line, f"tags.{i}")
        types.add(tag[2:])
    return types


def _check_entities(row: dict, line: int) -> set[str]:
    text = _string(row, "text", line)
    entities = row["entities"]
    if not isinstance(entities, list):
        raise DataFileError("must be a list of {label, start, end}", line, "entities")
    types = set()
    for i, e in enumerate(entities):
        where = f"entities.{i}"
        if not isinstance(e, dict) or set(e) - {"label", "start", "end", "text"}:
            raise DataFileError("must be {label, start, end} (character offsets into text)", line, where)
        _string(e, "label", line, f"{where}.label")
        start, end = e.get("start"), e.get("end")
        if not (type(start) is int and type(end) is int and 0 <= start < end <= len(text)):
            raise DataFileError(f"start and end must be offsets with 0 <= start < end <= {len(text)}", line, where)
        types.add(e["label"])
    return types


def check_row(row: object, line: int) -> tuple[str, str, set[str]]:
    """(form, task type, labels or entity types the row names) of a parsed row, or DataFileError."""
    if not isinstance(row, dict):
        raise DataFileError("each line must be a JSON object", line)
    form = _form_of(row, line)
    if form == "messages":
        _check_messages(row, line)
        return form, "generate", set()
    if form == "instruction":
        _string(row, "instruction", line)
        _string(row, "output", line)
        if "input" in row:
            _string(row, "input", line, empty_ok=True)
        return form, "generate", set()
    if form == "label":
        _string(row, "text", line)
        return form, "classify", {_string(row, "label", line)}
    if form == "bio":
        return form, "extract", _check_bio(row, line)
    return form, "extract", _check_entities(row, line)


def parse_rows(data: bytes, max_lines: int) -> tuple[list[dict], FileSummary]:
    """Every row of a JSONL file, checked, and what the file trains; DataFileError at the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataFileError("not UTF-8 text", line) from None
    rows, form, task_type, counts = [], None, None, {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(rows) >= max_lines:
            raise DataFileError(f"more than {max_lines} rows (PROMPTSERVE_FILES_MAX_LINES)", number)
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"not valid JSON ({exc.msg} at column {exc.colno})", number) from None
        row_form, row_type, names = check_row(row, number)
        if task_type is None:
            form, task_type = row_form, row_type
        elif row_type != task_type:
            raise DataFileError(f"a {row_type} row in a file of {task_type} rows (line 1's form): one task "
                                "type a file", number)
        for name in names:
            counts[name] = counts.get(name, 0) + (1 if row_type == "classify" else 0)
        rows.append(row)
    if not rows:
        raise DataFileError("the file has no rows")
    labels = sorted(counts, key=lambda k: (-counts[k], k)) if task_type == "classify" else sorted(counts)
    return rows, FileSummary(task_type, form, len(rows), labels, counts if task_type == "classify" else {})


def rows_with_lines(data: bytes) -> list[tuple[int, dict]]:
    """(line number, row) of a file already checked (for messages that name a line at job validation)."""
    return [(n, json.loads(raw)) for n, raw in enumerate(data.decode("utf-8").splitlines(), start=1) if raw.strip()]


def check_labels(data: bytes, task_type: str, labels: list[str], field_name: str) -> None:
    """Every label (classify) or entity type (extract) a checked file names is one of the task's."""
    known = set(labels)
    for line, row in rows_with_lines(data):
        _, _, names = check_row(row, line)
        unknown = sorted(names - known)
        if unknown:
            what = "label" if task_type == "classify" else "entity type"
            where = "label" if task_type == "classify" else ("tags" if "tags" in row else "entities")
            raise DataFileError(f"{field_name}: {what} {unknown[0]!r} is not one of the task's "
                                f"({', '.join(labels)})", line, where)
