"""Tool calling: tool definitions and calls in the prompt, calls parsed out of the answer, and the
grammar that makes a required or named call valid by construction.

A chat template that knows tools (it mentions `tools`) renders them its own way. One that does not (the
embedded SmolLM2's) gets the Hermes-style format many small instruct models were tuned on: the function
signatures in the system message inside <tools></tools>, calls answered as
<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>, results fed back as <tool_response>.
"""

from __future__ import annotations

import json
import uuid

from app.engine.constraints import ConstraintSpec, closed_objects

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_INSTRUCTIONS = (
    "You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call functions, answer with nothing but a JSON list of calls inside <tool_call></tool_call>, each "
    'call {{"name": <function name>, "arguments": <arguments object>}}:\n'
    '<tool_call>[{{"name": "...", "arguments": {{...}}}}]</tool_call>')


def _calls_json(tool_calls: list[dict]) -> str:
    calls = []
    for call in tool_calls:
        arguments = call["function"]["arguments"]
        try:
            arguments = json.loads(arguments)
        except (TypeError, ValueError):
            pass  # keep what the client sent
        calls.append({"name": call["function"]["name"], "arguments": arguments})
    return json.dumps(calls, ensure_ascii=False)


def _template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def render_tool_chat(tokenizer, messages: list[dict], tools: list[dict]) -> str:
    """The prompt text of a chat with tools (OpenAI-shaped messages and tool definitions)."""
    if _template_knows_tools(tokenizer):
        hf = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # transformers' templates take arguments as objects
                m["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                    "name": c["function"]["name"], "arguments": json.loads(_calls_json([c]))[0]["arguments"]}}
                    for c in m["tool_calls"]]
            hf.append(m)
        return tokenizer.apply_chat_template(hf, tools=tools or None, add_generation_prompt=True, tokenize=False)
    plain = []
    for m in messages:
        if m["role"] == "tool":
            response = json.dumps({"tool_call_id": m.get("tool_call_id"), "content": m.get("content") or ""},
                                  ensure_ascii=False)
            plain.append({"role": "user", "content": f"<tool_response>{response}</tool_response>"})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            text = (m.get("content") or "") + CALL_OPEN + _calls_json(m["tool_calls"]) + CALL_CLOSE
            plain.append({"role": "assistant", "content": text})
        else:
            plain.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        instructions = _INSTRUCTIONS.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                                            for t in tools))
        if plain and plain[0]["role"] == "system":
            plain[0] = {"role": "system", "content": plain[0]["content"] + "\n\n" + instructions}
        else:
            plain.insert(0, {"role": "system", "content": instructions})
    return tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


def calls_grammar(tools: list[dict], only: str | None = None, parallel: bool = True,
                  optional: bool = False) -> ConstraintSpec:
    """A grammar for an answer that is one or more valid calls (tool_choice "required"), or a call of
    the function `only` (a named tool_choice), or (`optional`: tool_choice "auto" with strict functions) free
    text or text then valid calls: each call's name one of the tools', its arguments valid against that
    tool's parameter schema.

    A forced call's arguments object is closed (no keys beyond the schema's unless it says
    additionalProperties itself), as vLLM's guidance backend does: an open schema, the default of most
    hand-written and LangChain tools, otherwise lets a model invent keys until max_tokens. In auto mode a
    function's schema is closed when it is `strict` (OpenAI's strict mode)."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        if only is not None and fn["name"] != only:
            continue
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not optional or fn.get("strict"):
            parameters = closed_objects(parameters)
        variants.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": parameters},
                         "required": ["name", "arguments"], "additionalProperties": False})
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {"type": "array", "items": item, "minItems": 1}
    if not parallel or only is not None:
        schema["maxItems"] = 1
    return ConstraintSpec("tagged_json", json.dumps(schema), prefix=CALL_OPEN, suffix=CALL_CLOSE, optional=optional)


def parse_tool_calls(text: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, OpenAI tool_calls) of an answer; no calls when it has none or
    they are not valid JSON naming known tools (then the whole answer is content)."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    end = text.find(CALL_CLOSE, start)
    body = text[start + len(CALL_OPEN):end if end >= 0 else len(text)].strip()
    try:
        parsed = json.loads(body)
    except ValueError:
        return text, []
    calls = parsed if isinstance(parsed, list) else [parsed]
    known = {t["function"]["name"] for t in tools}
    out = []
    for call in calls:
        if not (isinstance(call, dict) and call.get("name") in known and isinstance(call.get("arguments", {}), dict)):
            return text, []
        out.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                    "function": {"name": call["name"],
                                 "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}})
    content = text[:start].strip()
    return (content or None), out


class StreamedToolText:
    """A streamed answer to a chat with tools: its text goes out as it comes, except what may be the start
    of a call (a tail that could begin CALL_OPEN, and everything from CALL_OPEN on), which is held and
    parsed when the answer ends."""

    def __init__(self, tools: list[dict]):
        self.tools = tools
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> str:
        """More of the answer; returns the content that can be sent now."""
        self.text += piece
        start = self.text.find(CALL_OPEN, max(0, self.sent - len(CALL_OPEN)))
        if start >= 0:
            boundary = max(start, self.sent)
        else:
            boundary = len(self.text) - _partial_open_tail(self.text)
        out, self.sent = self.text[self.sent:boundary], max(boundary, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, tool calls) once the answer is complete."""
        content, calls = parse_tool_calls(self.text, self.tools)
        if calls:
            return "", calls
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest, []


def _partial_open_tail(text: str) -> int:
    """Length of the longest end of text that is a proper start of CALL_OPEN."""
    for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
