"""HTTP-level limits of `promptserve serve` (a real process, real sockets): header size, slow headers,
stalled bodies, body caps, and hostile text. Each case once made the server hang, grow or answer 500."""

import json
import socket
import threading
import time

import httpx
import pytest

from tests.servers import free_port, spawn, stop, wait_ready


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    env = {"PROMPTSERVE_MODEL": str(tiny_model_dir), "PROMPTSERVE_DTYPE": "float32", "PROMPTSERVE_SEED_DIR": "",
           "PROMPTSERVE_STORE_DIR": str(tmp_path_factory.mktemp("limits-store")),
           "PROMPTSERVE_HTTP_HEADER_TIMEOUT": "1", "PROMPTSERVE_HTTP_BODY_TIMEOUT": "1",
           "PROMPTSERVE_MAX_REQUEST_BYTES": str(1 << 20)}
    proc = spawn(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        yield base, port, httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    finally:
        stop(proc)


def _reply(sock: socket.socket, limit: float = 5.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_a_huge_header_is_refused_with_431(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(256):  # 16 MiB, in 64 KiB pieces: the server answers long before the end
                s.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _reply(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "http_error"


def test_large_bodies_are_not_mistaken_for_headers(server):
    """A body that arrives with its headers (or a large one on a keep-alive connection) is no header."""
    base, _, model = server
    with httpx.Client() as client:
        for _ in range(2):  # the second on the same connection
            messages = [{"role": "user", "content": "hi " * 30_000}] * 3  # a 270 KB body
            r = client.post(f"{base}/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 1})
            assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text[:300]


def test_slow_headers_and_stalled_bodies_are_closed(server):
    _, port, _ = server
    slow = []
    for _ in range(50):  # slowloris: headers that never end
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    idle = socket.create_connection(("127.0.0.1", port))  # sends nothing at all
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n{\"model\":")
    start = time.time()
    replies = [_reply(s) for s in slow + [idle, stalled]]
    assert time.time() - start < 8
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies), {r[:40] for r in replies}
    for s in slow + [idle, stalled]:
        s.close()
    assert httpx.get(f"{server[0]}/health").status_code == 200


def test_a_50_mb_prompt_is_refused_at_once_and_does_not_stall_others(server):
    base, _, model = server
    result = {}

    def neighbour():
        time.sleep(0.2)
        start = time.time()
        r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}, timeout=30)
        result["status"], result["seconds"] = r.status_code, time.time() - start

    t = threading.Thread(target=neighbour)
    t.start()
    big = json.dumps({"model": model, "prompt": "word " * 10_000_000, "max_tokens": 1})
    r = httpx.post(f"{base}/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)
    t.join(30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert result["status"] == 200 and result["seconds"] < 5


@pytest.mark.parametrize("route", ["tasks", "completions", "chat"])
def test_a_lone_surrogate_is_a_json_400_not_a_500(server, route):
    base, _, model = server
    text = '"\\ud800 x"'  # JSON text with a lone surrogate escape
    body = {"tasks": f'{{"prompt": {text}, "max_tokens": 2}}',
            "completions": f'{{"model": "{model}", "prompt": {text}, "max_tokens": 2}}',
            "chat": f'{{"model": "{model}", "messages": [{{"role": "user", "content": {text}}}]}}'}[route]
    url = {"tasks": f"{base}/v1/tasks/{model}", "completions": f"{base}/v1/completions",
           "chat": f"{base}/v1/chat/completions"}[route]
    r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(("prompt", "messages"))


def test_nan_and_tiny_temperatures(server):
    base, _, model = server
    r = httpx.post(f"{base}/v1/completions", content=f'{{"model": "{model}", "prompt": "x", "temperature": NaN}}',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    for t in (1e-40, 5e-324, 1e-6):
        r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 8,
                                                       "temperature": t})
        assert r.status_code == 200, r.text
