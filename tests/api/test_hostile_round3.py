"""The third round of hostile findings (issue 23), table-driven against a real `promptserve serve` process on
the tiny model: each case once made the server grow without bound, blame a client for its own limits, answer
an empty "valid" output, sample nothing, do unbounded work, hold a connection open, coerce a malformed body
or count usage wrong. The process's memory is read from /proc."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.helpers import head_prompt_set
from tests.servers import free_port, spawn, stop, wait_ready

ADMIN = {"Authorization": "Bearer hostile-admin"}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny, tmp_path_factory):
    port = free_port()
    store = tmp_path_factory.mktemp("hostile-store")
    env = {"PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(store), "PROMPTSERVE_ADMIN_TOKEN": "hostile-admin",
           "PROMPTSERVE_MAX_MODEL_LEN": "512", "PROMPTSERVE_WARMUP": "0"}
    proc = spawn(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        data = head_prompt_set(tiny.spec, "classify", ["ham", "spam"], rows=2).to_bytes(tiny.spec)
        r = httpx.put(f"{base}/admin/prompt-sets/spam", content=data, timeout=60,
                      headers={**ADMIN, "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        yield {"base": base, "port": port, "pid": proc.pid, "model": tiny.spec.name, "store": store}
    finally:
        stop(proc)


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _complete(server, timeout=120, **body) -> httpx.Response:
    return httpx.post(f"{server['base']}/v1/completions", timeout=timeout,
                      json={"model": server["model"], "prompt": "Hello", "max_tokens": 8, **body})


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


# -- 1 and 2: grammars ---------------------------------------------------------------------------------

HEAVY_REGEX = "a{1000}{%d}"

UNFOLLOWABLE = [
    {"regex": HEAVY_REGEX % 1001},
    {"grammar": 'root ::= "a" root'},
    {"json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}},
]


@pytest.mark.parametrize("fmt", UNFOLLOWABLE, ids=["heavy-regex", "endless-grammar", "required-recursion"])
def test_a_grammar_the_engine_cannot_follow_is_refused_before_generating_every_time(server, fmt):
    """Once: 400 'token N does not follow' after seconds; sent again: 200 with "" and finish_reason stop."""
    for attempt in range(2):
        start = time.monotonic()
        r = _complete(server, structured_outputs=fmt)
        assert r.status_code == 400, (attempt, r.text)
        assert _error(r)["code"] == "invalid_grammar" and _error(r)["param"] == "structured_outputs", r.text
        assert "limits" in _error(r)["message"]
        assert time.monotonic() - start < 10


def test_distinct_heavy_regexes_do_not_grow_the_server(server):
    """Each distinct heavy regex once kept 110-150 MiB that never came back (6 kept 716 MiB)."""
    _complete(server, structured_outputs={"regex": HEAVY_REGEX % 1002})  # the allocator's first growth
    before = _rss_mib(server["pid"])
    for n in range(1003, 1011):
        r = _complete(server, structured_outputs={"regex": HEAVY_REGEX % n})
        assert r.status_code == 400 and _error(r)["code"] == "invalid_grammar"
    grown = _rss_mib(server["pid"]) - before
    assert grown < 150, f"8 heavy regexes grew the server by {grown:.0f} MiB"


def test_many_distinct_ordinary_schemas_are_served(server):
    for n in range(12):
        schema = {"type": "object", "properties": {f"k{n}": {"type": "string", "maxLength": 3}},
                  "required": [f"k{n}"], "additionalProperties": False}
        r = _complete(server, max_tokens=30, structured_outputs={"json": schema})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert set(json.loads(choice["text"])) == {f"k{n}"}


# -- 3: forced tool calls with open schemas ------------------------------------------------------------

OPEN_TOOL = {"type": "function", "function": {"name": "set_mode", "parameters": {
    "type": "object", "properties": {"mode": {"type": "string", "enum": ["on", "off"]}}, "required": ["mode"]}}}


@pytest.mark.parametrize("choice,parallel", [("required", False), ("required", True),
                                             ({"type": "function", "function": {"name": "set_mode"}}, True)],
                         ids=["required", "required-parallel", "named"])
def test_forced_calls_with_an_open_schema_have_exactly_its_keys(server, choice, parallel):
    """additionalProperties unset (LangChain's default): the model invented keys until max_tokens."""
    for seed in range(4):
        r = httpx.post(f"{server['base']}/v1/chat/completions", timeout=120, json={
            "model": server["model"], "messages": [{"role": "user", "content": "Turn it on"}], "tools": [OPEN_TOOL],
            "tool_choice": choice, "parallel_tool_calls": parallel, "max_tokens": 60, "temperature": 1.0,
            "seed": seed})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        calls = c["message"]["tool_calls"]
        # one call finishes within max_tokens; parallel calls may run on (a random model adds items) and be cut
        assert c["finish_reason"] == "tool_calls" or (parallel and choice == "required"), c
        assert calls and all(set(json.loads(call["function"]["arguments"])) == {"mode"} for call in calls), c


def test_a_strict_function_in_auto_mode_gets_a_grammar(server):
    """`function.strict: true` was ignored in auto mode; now its calls follow a grammar, which is one output
    format: asking for another beside it is refused by name."""
    strict = {"type": "function", "function": {**OPEN_TOOL["function"], "strict": True}}
    r = httpx.post(f"{server['base']}/v1/chat/completions", timeout=120, json={
        "model": server["model"], "messages": [{"role": "user", "content": "Turn it on"}], "tools": [strict],
        "response_format": {"type": "json_object"}, "max_tokens": 8})
    assert r.status_code == 400 and _error(r)["param"] == "response_format" and "tools" in _error(r)["message"], \
        r.text


def test_the_auto_strict_grammar_takes_text_or_valid_calls_only(tiny):
    """The grammar itself, token by token: free text, text then a valid call, but no call with a key the
    closed schema lacks."""
    from app.engine.constraints import Grammars
    from app.services.tools import calls_grammar

    strict = {"type": "function", "function": {**OPEN_TOOL["function"], "strict": True}}
    grammars = Grammars(tiny.tokenizer, tiny.model.config.vocab_size, [tiny.tokenizer.eos_token_id])
    spec = calls_grammar([strict], optional=True)

    def follows(text: str) -> bool:
        c = grammars.constraint(spec)
        return all(c.accept(t) for t in tiny.tokenizer.encode(text, add_special_tokens=False))
    assert follows("Sure, it is on. <b>bold</b> and <to be sure")
    assert follows('Calling: <tool_call>[{"name":"set_mode","arguments":{"mode":"on"}}]</tool_call>')
    assert not follows('<tool_call>[{"name":"set_mode","arguments":{"mode":"on","extra":1}}]</tool_call>')


def test_a_strict_function_in_auto_mode_is_followed_when_called(server):
    strict = {"type": "function", "function": {**OPEN_TOOL["function"], "strict": True}}
    for seed in range(4):
        r = httpx.post(f"{server['base']}/v1/chat/completions", timeout=120, json={
            "model": server["model"], "messages": [{"role": "user", "content": "Turn it on"}], "tools": [strict],
            "max_tokens": 40, "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        for call in c["message"].get("tool_calls") or []:
            assert set(json.loads(call["function"]["arguments"])) == {"mode"}


# -- 4: every accepted sampling value samples --------------------------------------------------------

EXTREMES = [("repetition_penalty", 0.01), ("repetition_penalty", 2.0), ("temperature", 1e-300),
            ("temperature", 2.0), ("top_p", 5e-324), ("top_k", -1), ("top_k", 10**9), ("min_p", 1e-300),
            ("min_p", 1.0), ("frequency_penalty", -2.0), ("frequency_penalty", 2.0), ("presence_penalty", -2.0),
            ("presence_penalty", 2.0), ("logit_bias", {str(i): -100 for i in range(1024)}),
            ("logit_bias", {str(i): 100 for i in range(1024)}), ("seed", -(2**63)), ("seed", 2**64 - 1)]


@pytest.mark.parametrize("field,value", EXTREMES, ids=[f"{f}={str(v)[:12]}" for f, v in EXTREMES])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_accepted_sampling_value_samples(server, field, value, temperature):
    body = {"temperature": temperature, field: value}
    r = _complete(server, **body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1e-300), ("repetition_penalty", 0.0),
                                         ("repetition_penalty", 0.009)])
def test_values_that_cannot_sample_are_refused_naming_the_field(server, field, value):
    """repetition_penalty 1e-300 was accepted, then failed as "the output's grammar allows no next token"."""
    r = _complete(server, **{field: value})
    assert r.status_code == 400 and _error(r)["param"] == field, r.text


# -- 5: work bounded by the context ------------------------------------------------------------------

def test_tokenize_of_megabytes_is_refused_before_the_work(server):
    """512 messages x 7k characters: 1.18M tokens counted in 5.4 s, +337 MiB, /health 1.5 s."""
    messages = [{"role": "user", "content": "word " * 1400} for _ in range(512)]
    start = time.monotonic()
    r = httpx.post(f"{server['base']}/tokenize", json={"messages": messages}, timeout=60)
    assert r.status_code == 400 and _error(r)["code"] == "too_many_tokens", r.text[:300]
    assert time.monotonic() - start < 3
    # a prompt a little too long is still counted (a client measures what to cut)
    r = httpx.post(f"{server['base']}/tokenize", json={"prompt": "word " * 1000}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] > 512


def test_a_chat_of_megabytes_is_refused_by_its_length(server):
    messages = [{"role": "user", "content": "word " * 1400} for _ in range(512)]
    r = httpx.post(f"{server['base']}/v1/chat/completions", timeout=60,
                   json={"model": server["model"], "messages": messages, "max_tokens": 1})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded", r.text[:300]


@pytest.mark.parametrize("route", ["task", "openai"])
def test_texts_longer_than_a_task_reads_are_refused_before_any_runs(server, route):
    """256 texts of 5,001 tokens each were accepted (then cut to 256 tokens silently): minutes of CPU."""
    texts = ["ok", "word " * 300]
    if route == "task":
        r = httpx.post(f"{server['base']}/v1/tasks/spam", json={"texts": texts}, timeout=60)
    else:
        r = httpx.post(f"{server['base']}/v1/completions", json={"model": "spam", "prompt": texts}, timeout=60)
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded", r.text
    assert "text 1" in _error(r)["message"]
    assert httpx.post(f"{server['base']}/v1/tasks/spam", json={"texts": ["ok", "word " * 200]},
                      timeout=60).status_code == 200


# -- 6: slow bodies -----------------------------------------------------------------------------------

def test_a_trickled_body_is_closed(server):
    """10 bytes a second never stalls the body timeout: such uploads stayed open past 60 s."""
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n")
        start, reply = time.monotonic(), b""
        s.settimeout(0.5)
        while time.monotonic() - start < 30:
            try:
                s.sendall(b"          ")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
        took = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"too slowly" in reply and took < 15, took


# -- 7: strict bodies -----------------------------------------------------------------------------------

STRICT = [("/v1/completions", {"stream": "yes"}, "stream"), ("/v1/completions", {"max_tokens": "10"}, "max_tokens"),
          ("/v1/completions", {"max_tokens": True}, "max_tokens"), ("/v1/completions", {"echo": 1}, "echo"),
          ("/v1/completions", {"logit_bias": {"1000000000000": 1}}, "logit_bias"),
          ("/v1/completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
          ("/v1/completions", {"logit_bias": {"49152": 1}}, "logit_bias"),
          ("/v1/completions", {"temperature": "0.5"}, "temperature"),
          ("/detokenize", {"tokens": ["1"]}, "tokens.0"), ("/tokenize", {"prompt": "x", "add_special_tokens": "no"},
                                                           "add_special_tokens"),
          ("/v1/tasks/{model}", {"prompt": "x", "stream": "yes"}, "stream"),
          ("/v1/tasks/{model}", {"prompt": "x", "max_tokens": "10"}, "max_tokens")]


@pytest.mark.parametrize("path,fields,param", STRICT, ids=[f"{p}:{json.dumps(f)[:30]}" for p, f, _ in STRICT])
def test_a_malformed_field_is_refused_by_name_not_coerced(server, path, fields, param):
    body = {"model": server["model"], "prompt": "Hello", "max_tokens": 2} if path == "/v1/completions" else {}
    r = httpx.post(server["base"] + path.format(model=server["model"]), json={**body, **fields}, timeout=60)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param, r.text


def test_error_params_name_the_field_not_validator_internals(server):
    body = json.dumps({"model": server["model"], "prompt": "x", "stop": ["ok", "\ud800"]})  # escaped: JSON allows it
    r = httpx.post(f"{server['base']}/v1/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and _error(r)["param"] == "stop.1", r.text
    r = httpx.post(f"{server['base']}/v1/chat/completions", timeout=60, json={
        "model": server["model"], "messages": [{"role": "user", "content": "x"}], "tools": [OPEN_TOOL],
        "tool_choice": {"type": "function", "function": {"name": 7}}})
    assert r.status_code == 400 and "[" not in _error(r)["param"] and "Named" not in _error(r)["param"], r.text


# -- 9: smaller ones ----------------------------------------------------------------------------------

def test_activating_a_version_of_a_missing_task_leaves_nothing(server):
    for method, path in [("POST", "/admin/prompt-sets/ghost/versions/1/activate"),
                         ("DELETE", "/admin/prompt-sets/ghost/versions/1"), ("DELETE", "/admin/prompt-sets/ghost")]:
        r = httpx.request(method, server["base"] + path, headers=ADMIN, timeout=30)
        assert r.status_code == 404, r.text
    assert not list(server["store"].rglob("ghost*"))


def test_task_names_that_differ_only_in_case_are_refused(server, tiny):
    data = head_prompt_set(tiny.spec, "classify", ["ham", "spam"], rows=2, seed=3).to_bytes(tiny.spec)
    r = httpx.put(f"{server['base']}/admin/prompt-sets/SPAM", content=data, timeout=60,
                  headers={**ADMIN, "Content-Type": "application/octet-stream"})
    assert r.status_code == 409 and "case" in _error(r)["message"], r.text


def test_streamed_chat_with_tools_attached_streams_its_text(server):
    """With tools offered (auto), the text arrived in one delta at the end."""
    with httpx.stream("POST", f"{server['base']}/v1/chat/completions", timeout=120, json={
            "model": server["model"], "messages": [{"role": "user", "content": "Hello"}], "tools": [OPEN_TOOL],
            "max_tokens": 24, "ignore_eos": True, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    text = "".join(x or "" for x in contents)
    assert "<tool_call>" in text or len([x for x in contents if x]) > 3, contents


@pytest.mark.parametrize("prompts", [["Hello"], ["Hello", "A longer prompt here"]])
def test_streamed_usage_counts_each_prompt_once(server, prompts):
    """Streamed /v1/completions with n=3 counted the prompt's tokens once per choice (6 against 2)."""
    body = {"prompt": prompts, "n": 3, "max_tokens": 4, "ignore_eos": True}
    plain = _complete(server, **body).json()["usage"]
    with httpx.stream("POST", f"{server['base']}/v1/completions", timeout=120, json={
            "model": server["model"], **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = chunks[-1]["usage"]
    assert streamed == plain, (streamed, plain)
    assert plain["completion_tokens"] == 4 * 3 * len(prompts)
