"""Output formats a request may ask for (structured outputs), the same on every generation endpoint:
OpenAI's `response_format`, vLLM's `structured_outputs` and its older `guided_*` fields, and the grammar a
required tool call needs. At most one per request."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from app.api.errors import ApiError
from app.api.fields import ClosedModel, Name, Text
from app.engine.constraints import ConstraintSpec, closed_objects


class JsonSchemaFormat(ClosedModel):
    name: Name = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(ClosedModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self


class StructuredOutputs(ClosedModel):
    """vLLM's `structured_outputs`: exactly one of these."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1, max_length=256)
    grammar: Text | None = None
    json_object: bool | None = None


def output_format(response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None,
                  guided: list[tuple[str, str, Any]] = (), extra: list[tuple[str, ConstraintSpec]] = (),
                  ignore_eos: bool = False) -> tuple[str, ConstraintSpec] | None:
    """(field, spec) of the one output format a request asks for, or None; 400 naming the field when it
    asks for two, or for one together with ignore_eos (a grammar ends with the end-of-sequence token)."""
    found: list[tuple[str, ConstraintSpec]] = list(extra)
    rf = response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", ConstraintSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_
        if rf.json_schema.strict:
            schema = closed_objects(schema)
        found.append(("response_format", ConstraintSpec("json_schema", json.dumps(schema))))
    so = structured_outputs
    if so is not None:
        given = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                     ("grammar", so.grammar), ("json_object", so.json_object or None))
                 if v is not None]
        if len(given) != 1:
            raise ApiError(400, "invalid_request", "structured_outputs needs exactly one of json, regex, "
                           "choice, grammar, json_object", param="structured_outputs")
        found.append(("structured_outputs", _spec(*given[0])))
    for name, kind, value in guided:
        if value is not None:
            found.append((name, _spec(kind, value)))
    if len(found) > 1:
        raise ApiError(400, "invalid_request", "ask for one output format at a time, not "
                       + " and ".join(f for f, _ in found), param=found[1][0])
    if found and ignore_eos:
        raise ApiError(400, "invalid_request", "ignore_eos cannot go with an output format", param="ignore_eos")
    return found[0] if found else None


def _spec(kind: str, value) -> ConstraintSpec:
    if kind == "json":
        schema = value if isinstance(value, str) else json.dumps(value)
        return ConstraintSpec("json_schema", schema)
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind == "choice":
        return ConstraintSpec("choice", choices=tuple(value))
    return ConstraintSpec(kind, value)
