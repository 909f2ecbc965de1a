"""Structured outputs: grammars the generated tokens must follow, enforced per request inside the mixed
batch by masking that request's logits before it samples.

The grammar engine is llguidance (the Rust engine behind OpenAI's own structured outputs): JSON schemas,
regexes and Lark/GBNF grammars, compiled against the tokenizer in about 3 ms for a nested schema here,
and a matcher fills one request's token bitmask in about 0.26 ms per token on CPU (SmolLM2's 49,152
tokens, AMD EPYC, mask applied) -- under 1% of a decode step, paid by the constrained request alone.
xgrammar was measured too (5 ms compile, 0.09 ms per mask): faster per token, but its wheel requires
triton on Linux x86_64, 999 MB installed, for GPU kernels a CPU server never runs; llguidance is a 7.6 MB
wheel with no dependencies, and its bitmask is a plain int32 tensor our sampler applies itself.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import llguidance
import llguidance.hf
import torch
from llguidance.gbnf_to_lark import any_to_lark

# No free whitespace in generated JSON: a model could otherwise spend every token on spaces and newlines
# and never close the object (a schema's own "x-guidance" options win).
_JSON_OPTIONS = {"whitespace_flexible": False}


class InvalidConstraint(ValueError):
    """A schema, regex or grammar the engine cannot compile: the request is refused by name."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asks its output to follow.

    kind: json_object (any JSON object), json_schema (value: the schema as JSON text), regex, grammar
    (Lark or GBNF), choice (choices: one of these strings exactly), tagged_json (the JSON of schema `value`
    between the literal texts `prefix` and `suffix`: tool calls; `optional`: free text instead, or free text
    then the tagged JSON -- free text never contains `prefix` itself)."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""
    optional: bool = False


def closed_objects(schema):
    """OpenAI's strict mode: an object schema that does not say otherwise admits no other keys (in JSON
    Schema an unspecified additionalProperties admits any, and a model would then invent some)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v
           for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class Constraint:
    """One request's matcher: which tokens may come next, fed the tokens it chose."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int,
                 on_error: Callable[[str], None] | None = None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._on_error = on_error

    def accept(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id)

    def failed(self) -> str:
        """The matcher broke (a limit, or nothing allowed): reported once, so the grammar is refused from now
        on; returns the reason."""
        reason = _first_error(self.matcher) if self.matcher.is_error() else "no token is allowed"
        if self._on_error is not None:
            self._on_error(reason)
            self._on_error = None
        return reason

    @property
    def finished(self) -> bool:
        """The grammar is complete and its end (a stop token) was accepted."""
        return self.matcher.is_stopped()


_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor: llguidance.LLExecutor | None = None


def mask_rows(constraints: list[Constraint], logits: torch.Tensor) -> None:
    """Mask rows [k, V] (float32) of logits in place, row i by constraints[i]: the bitmasks are filled in
    parallel by llguidance's threads (no GIL), then unpacked and applied in one tensor operation."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor(num_threads=max(1, min(4, torch.get_num_threads())))
    k, vocab = logits.shape
    words = (constraints[0].vocab_size + 31) // 32
    bitmask = torch.empty((k, words), dtype=torch.int32)
    _executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(constraints)], bitmask.data_ptr(),
                                      words * 4, k)
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(k, -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))


def _json_grammar(schema_text: str) -> str:
    try:
        schema = json.loads(schema_text)
    except ValueError as exc:
        raise InvalidConstraint(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidConstraint("a JSON schema is a JSON object")
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


def grammar_text(spec: ConstraintSpec) -> str:
    """The llguidance grammar of a spec (compiled, and checked, when a matcher is made from it)."""
    if spec.kind == "json_object":  # an object, as OpenAI's json_object promises (not any JSON value)
        return _json_grammar('{"type": "object"}')
    if spec.kind == "json_schema":
        return _json_grammar(spec.value)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "grammar":
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.value))
        except Exception as exc:  # the GBNF-to-Lark conversion reports a bad grammar by raising
            raise InvalidConstraint(f"cannot read the grammar: {exc}") from None
    if spec.kind == "choice":
        if not spec.choices:
            raise InvalidConstraint("choice needs at least one string")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choices))
    if spec.kind == "tagged_json":
        _json_grammar(spec.value)  # the schema itself is checked by name first
        schema = {**json.loads(spec.value), "x-guidance": _JSON_OPTIONS}
        body = f"body: %json {json.dumps(schema)}\n"
        if not spec.optional:
            return llguidance.LLMatcher.grammar_from_lark(
                f"start: {json.dumps(spec.prefix)} body {json.dumps(spec.suffix)}\n" + body)
        # two lexemes the lexer follows side by side: TEXT (no prefix anywhere) and OPEN (text up to the first
        # prefix); one regex each, so the lexer never has to take back a '<' it gave to the text
        tag = re.escape(spec.prefix)
        return llguidance.LLMatcher.grammar_from_lark(
            f"start: TEXT | OPEN body {json.dumps(spec.suffix)}\n" + body
            + f"TEXT: /(?s:.*)/ & ~/(?s:.*{tag}.*)/\nOPEN: /(?s:.*{tag})/ & ~/(?s:.*{tag}.+)/\n")
    raise InvalidConstraint(f"unknown constraint kind {spec.kind!r}")


@dataclass(frozen=True)
class GrammarLimits:
    """What one grammar may cost, and what all cached grammars may hold.

    llguidance builds its lexer lazily, while masks are computed, and a regex such as a{1000}{1001} grows
    it by hundreds of MiB; its own defaults (250,000 lexer states at 1-2 kB each) allow that. Here a grammar
    gets `max_lexer_states`, its compile and first masks are timed and weighed, and what is kept is bounded
    by bytes, not by a count of entries."""

    max_lexer_states: int = 20_000  # about 20-40 MiB of lexer at most
    max_grammar_size: int = 200_000  # symbols in the grammar's productions
    initial_lexer_fuel: int = 1_000_000  # ~20 ms of regex analysis
    step_lexer_fuel: int = 200_000  # ~15 ms per mask
    max_bytes: int = 64 << 20  # one grammar's measured memory
    max_seconds: float = 2.0  # one grammar's compile and probe
    probe_tokens: int = 8  # masks computed (and tokens taken) before the grammar is accepted
    cache_bytes: int = 256 << 20  # all compiled grammars kept together

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(max_lexer_states=self.max_lexer_states,
                                         max_grammar_size=self.max_grammar_size,
                                         initial_lexer_fuel=self.initial_lexer_fuel,
                                         step_lexer_fuel=self.step_lexer_fuel, verbose_errors=False)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def allowed_tokens(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    """The ids the matcher allows next (a 1-D tensor)."""
    bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
    allowed = ((bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(-1)[:vocab_size]
    return allowed.nonzero().view(-1)


def _first_error(matcher: llguidance.LLMatcher) -> str:
    return matcher.get_error().split("\n", 1)[0]


@dataclass
class _Compiled:
    matcher: llguidance.LLMatcher | None
    error: str | None
    weight: int


class Grammars:
    """Compiles constraint specs for one tokenizer, keeping compiled matchers to copy (bounded by bytes).

    A grammar is decided before a request generates: it is compiled and then walked for `probe_tokens`
    tokens (each mask computed, one allowed token taken), so a grammar the engine cannot follow (a lexer or
    parser limit, nothing allowed at the start) is refused with 400 `invalid_grammar` up front instead of
    failing mid-generation. Refusals are cached too (small), so sending one again is refused at once. A
    grammar that still breaks a limit later in some generation is refused from then on (`forget`): its
    compiled lexer, shared with every copy, is in an error state and must never be copied again."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, limits: GrammarLimits | None = None):
        self.vocab_size = vocab_size
        self.limits = limits or GrammarLimits()
        self._stop_ids = set(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=sorted(stop_token_ids) or None)
        self._cache: OrderedDict[ConstraintSpec, _Compiled] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # the cache's bookkeeping
        self._compiling = threading.Lock()  # one compile at a time, so its memory growth is its own

    def constraint(self, spec: ConstraintSpec) -> Constraint:
        """A fresh matcher for one request (a copy of the compiled one: compiling happens once per spec)."""
        compiled = self._lookup(spec)
        if compiled is None:
            compiled = self._put(spec, self._compile(spec))
        if compiled.error is not None:
            raise InvalidConstraint(compiled.error)
        copy = compiled.matcher.deep_copy()
        if copy.is_error():  # cannot happen after forget(); checked so that it never generates
            self.forget(spec, _first_error(copy))
            raise InvalidConstraint(f"the {_what(spec)} exceeds the grammar engine's limits: {_first_error(copy)}")
        return Constraint(copy, self.vocab_size, on_error=lambda message: self.forget(spec, message))

    def forget(self, spec: ConstraintSpec, error: str) -> None:
        """A grammar that broke a limit while a request followed it: refused from now on."""
        self._put(spec, _Compiled(None, f"the {_what(spec)} exceeds the grammar engine's limits: {error}",
                                  _REFUSAL_BYTES))

    def _lookup(self, spec: ConstraintSpec) -> _Compiled | None:
        with self._lock:
            found = self._cache.get(spec)
            if found is not None:
                self._cache.move_to_end(spec)
            return found

    def _put(self, spec: ConstraintSpec, compiled: _Compiled) -> _Compiled:
        with self._lock:
            old = self._cache.pop(spec, None)
            if old is not None:
                self._cached_bytes -= old.weight
            if compiled.weight <= self.limits.cache_bytes:
                self._cache[spec] = compiled
                self._cached_bytes += compiled.weight
            while self._cached_bytes > self.limits.cache_bytes and self._cache:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.weight
        return compiled

    def _compile(self, spec: ConstraintSpec) -> _Compiled:
        with self._compiling:
            before, start = _resident_bytes(), time.monotonic()
            try:
                matcher = self._build(spec)
                self._probe(spec, matcher)
            except InvalidConstraint as exc:
                return _Compiled(None, str(exc), _REFUSAL_BYTES)
            seconds = time.monotonic() - start
            after = _resident_bytes()
        # what the process grew by while this grammar compiled and took its first tokens (compiles are
        # serialized; the engine allocates nothing per step): at least a floor for its text
        grown = (after - before) if before is not None and after is not None else 0
        weight = max(grown, _MIN_BYTES + 64 * len(spec.value) + 64 * sum(len(c) for c in spec.choices))
        limits = self.limits
        if weight > limits.max_bytes:
            return _Compiled(None, f"the {_what(spec)} needs {weight >> 20} MiB of the grammar engine, more than "
                             f"this server's limit of {limits.max_bytes >> 20} MiB per grammar", _REFUSAL_BYTES)
        if seconds > limits.max_seconds:
            return _Compiled(None, f"the {_what(spec)} took {seconds:.1f} s to compile, more than this server's "
                             f"limit of {limits.max_seconds:g} s per grammar", _REFUSAL_BYTES)
        return _Compiled(matcher, None, weight)

    def _build(self, spec: ConstraintSpec) -> llguidance.LLMatcher:
        try:
            text = grammar_text(spec)
        except InvalidConstraint:
            raise
        except Exception as exc:
            raise InvalidConstraint(f"cannot compile the {_what(spec)}: {exc}") from None
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0, limits=self.limits.parser_limits())
        if matcher.is_error():
            raise InvalidConstraint(f"cannot compile the {_what(spec)}: {_first_error(matcher)}")
        return matcher

    def _probe(self, spec: ConstraintSpec, matcher: llguidance.LLMatcher) -> None:
        """Walk a copy for a few tokens: each mask must be computable and allow a token the matcher then
        takes. The first allowed token that is not a stop is taken (a stop ends the walk: the grammar is
        complete there)."""
        walker = matcher.deep_copy()
        for step in range(self.limits.probe_tokens):
            allowed = allowed_tokens(walker, self.vocab_size)
            if walker.is_error():
                raise InvalidConstraint(f"the {_what(spec)} exceeds the grammar engine's limits: "
                                        f"{_first_error(walker)}")
            ids = allowed.tolist()
            if not ids:
                raise InvalidConstraint(f"the {_what(spec)} allows no output" if step == 0 else
                                        f"the {_what(spec)} allows no token after {step} tokens")
            token = next((t for t in ids if t not in self._stop_ids), None)
            if token is None:
                return  # only a stop may follow: the grammar is complete
            if not walker.consume_token(token):
                raise InvalidConstraint(f"the {_what(spec)} exceeds the grammar engine's limits: "
                                        f"{_first_error(walker)}")
        if matcher.is_error():  # the walk shares the compiled lexer: it must still be sound
            raise InvalidConstraint(f"the {_what(spec)} exceeds the grammar engine's limits: "
                                    f"{_first_error(matcher)}")


_MIN_BYTES = 64 << 10
_REFUSAL_BYTES = 1 << 10


def _what(spec: ConstraintSpec) -> str:
    return {"json_object": "JSON object format", "json_schema": "JSON schema", "tagged_json": "tool-call schema",
            "choice": "choice"}.get(spec.kind, spec.kind)
