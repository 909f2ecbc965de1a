"""Structured outputs: grammars the generated tokens must follow, enforced per request inside the mixed
batch by masking that request's logits before it samples.

The grammar engine is xgrammar: it compiles a JSON schema, a regex or an EBNF grammar against the
tokenizer's vocabulary in milliseconds (5 ms for a nested schema here, cached by the compiler), and a
matcher fills one request's token bitmask in about 0.1 ms per token on CPU (SmolLM2's 49,152 tokens,
AMD EPYC), so a constrained request costs its neighbours nothing but that mask; its bitmask and in-place
masking work on torch CPU tensors, which is how our sampler already holds the logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import xgrammar as xgr


class InvalidConstraint(ValueError):
    """A schema, regex or grammar the engine cannot compile: the request is refused by name."""


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asks its output to follow.

    kind: json_object (any JSON object), json_schema (value: the schema as JSON text), regex, grammar
    (EBNF, xgrammar's dialect of GBNF), choice (choices: one of these strings exactly), tagged_json (the
    JSON of schema `value` between the literal texts `prefix` and `suffix`: tool calls)."""

    kind: str
    value: str = ""
    choices: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""


class Constraint:
    """One request's matcher: which tokens may come next, fed the tokens it chose."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] (float32) of every token the grammar forbids next to -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._bitmask)

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar is complete and its end (a stop token) was accepted."""
        return self._matcher.is_terminated()


class Grammars:
    """Compiles constraint specs for one tokenizer; compiled grammars are cached by the compiler."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)

    def compile(self, spec: ConstraintSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":  # an object, as OpenAI's json_object promises (not any JSON value)
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "json_schema":
                return self._compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.value)
            if spec.kind == "grammar":
                return self._compiler.compile_grammar(spec.value)
            if spec.kind == "tagged_json":
                parts = [xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.prefix)}")] if spec.prefix else []
                parts.append(xgr.Grammar.from_json_schema(spec.value, any_whitespace=False, strict_mode=True))
                if spec.suffix:
                    parts.append(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(spec.suffix)}"))
                return self._compiler.compile_grammar(xgr.Grammar.concat(*parts))
            if spec.kind == "choice":
                if not spec.choices:
                    raise InvalidConstraint("choice needs at least one string")
                # JSON string literals are valid EBNF literals, escapes included
                return self._compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choices))
        except InvalidConstraint:
            raise
        except Exception as exc:  # xgrammar reports a bad schema/regex/grammar as RuntimeError or ValueError
            raise InvalidConstraint(f"cannot compile the {spec.kind.replace('_', ' ')}: {exc}") from None
        raise InvalidConstraint(f"unknown constraint kind {spec.kind!r}")

    def constraint(self, spec: ConstraintSpec) -> Constraint:
        return Constraint(self.compile(spec), self.vocab_size)
