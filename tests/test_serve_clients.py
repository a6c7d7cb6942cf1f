"""What clients can make of the server's text, counts and log, tried as an attacker would: generated U+FFFD characters
come out as text, hang-ups at any point are counted as the client's (499, never a 5xx), credentials in URLs and headers
never reach the log, and every chat error names a field that chat requests have."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
import struct
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
from serve_process import ServerProcess, serving_model

from tablefree.serve.protocol import ChatCompletionRequest
from tablefree.serve.server import log_handler

KEY = "sk-clients-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 64
MODEL = "MODEL"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An API key, a short context, and the access log on (--log-level info)."""
    proc = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / "clients.log",
                         "--max-model-len", str(CONTEXT), "--served-model-name", MODEL, "--log-level", "info",
                         env={"TABLEFREE_API_KEY": KEY})
    yield proc
    assert proc.stop() in (0, -signal.SIGTERM), proc.log_path.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


# ---- generated U+FFFD characters are text ----
U_FFFD = {"temperature": 0, "logit_bias": {"65533": 100}, "max_tokens": 5}  # the code-point tokenizer's id of U+FFFD


def test_generated_u_fffd_characters_are_text(client):
    out = client.completions.create(model=MODEL, prompt="x", logprobs=0, **U_FFFD)
    assert out.choices[0].logprobs.tokens == ["\ufffd"] * 5
    assert out.choices[0].text == "\ufffd" * 5 and out.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=MODEL, prompt="x", stream=True, **U_FFFD)
    assert "".join(chunk.choices[0].text for chunk in streamed) == "\ufffd" * 5
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **U_FFFD)
    assert chat.choices[0].message.content == "\ufffd" * 5
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True, **U_FFFD)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == "\ufffd" * 5


def test_a_u_fffd_stop_string_stops(client):
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="x", stop="\ufffd", stream=stream, **U_FFFD)
        chunks = list(out) if stream else [out]
        assert "".join(c.choices[0].text for c in chunks) == ""
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stop=["\ufffd"],
                                              stream=stream, **U_FFFD)
        chunks = list(chat) if stream else [chat]
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


# ---- hang-ups are the client's doing ----
def request_counts(server) -> dict[tuple[str, str], float]:
    """tablefree_requests_total by (endpoint, status), less /metrics itself (each look counts one)."""
    counts = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        found = re.fullmatch(r'tablefree_requests_total\{endpoint="([^"]*)",status="([^"]*)"\} (\S+)', line)
        if found and found[1] != "/metrics":
            counts[found[1], found[2]] = float(found[3])
    return counts


def head(path: str, length: int, key: str = KEY) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


COMPLETION = json.dumps({"prompt": "x", "max_tokens": CONTEXT - 8, "ignore_eos": True}).encode()
STREAM = json.dumps({"prompt": "x", "max_tokens": CONTEXT - 8, "ignore_eos": True, "stream": True}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 8}).encode()
# (bytes sent before hanging up, whether to read the first stream event first, the endpoint a count must name)
HANG_UPS = {
    "mid-head": (head("/v1/completions", len(COMPLETION))[:30], False, None),  # no request yet: nothing to count
    "head only": (head("/v1/completions", len(COMPLETION)), False, "/v1/completions"),
    "mid-body": (head("/v1/completions", len(COMPLETION)) + COMPLETION[:9], False, "/v1/completions"),
    "chat mid-body": (head("/v1/chat/completions", len(CHAT)) + CHAT[:20], False, "/v1/chat/completions"),
    "tokenize mid-body": (head("/tokenize", 40) + b'{"prompt": "', False, "/tokenize"),
    "before the answer": (head("/v1/completions", len(COMPLETION)) + COMPLETION, False, None),
    "mid-stream": (head("/v1/completions", len(STREAM)) + STREAM, True, None),
}


def hang_up(port: int, sent: bytes, read_first: bool, reset: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(sent)
        if read_first:
            while b"data: " not in sock.recv(65536):
                pass
        if reset:  # an abortive close (RST) rather than FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_storm_of_hang_ups_counts_no_5xx(server):
    """56 clients at once hang up at every point (mid-head, after the head, mid-body, with FIN or RST, before the
    answer, mid-stream): each request that arrived is counted once, under its endpoint, as 499 (or 200 when its
    answer was complete first); no 5xx is counted."""
    before = request_counts(server)
    plan = [(name, reset) for name in HANG_UPS for reset in (False, True)] * 4
    clients = [threading.Thread(target=hang_up, args=(server.port, *HANG_UPS[name][:2], reset)) for name, reset in plan]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    arrived = sum(name != "mid-head" for name, _ in plan)
    deadline = time.monotonic() + 120  # a bound on waiting for the server's bookkeeping, not a timing assertion
    while True:
        counts = request_counts(server)
        added = {label: counts[label] - before.get(label, 0) for label in counts if counts[label] != before.get(label, 0)}
        if sum(added.values()) >= arrived or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not [label for label in counts if label[1].startswith("5")], counts
    assert sum(added.values()) == arrived, added
    assert {status for _, status in added} <= {"499", "200"}, added
    cut_short = Counter(HANG_UPS[name][2] for name, _ in plan if HANG_UPS[name][2])
    for endpoint, count in cut_short.items():  # a hang-up before the body is whole is 499 under the endpoint it was for
        assert added.get((endpoint, "499"), 0) >= count, (endpoint, added)
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- credentials never reach the log ----
LEAKS = [f"leak{i:02d}c0ffee" for i in range(14)]


def test_credentials_in_urls_are_redacted_from_the_access_log(server):
    """Credential parameters by many names, percent-encoded names, repeated ones, the server's own key anywhere in
    the URL, an absolute URL with user:password@: the access log keeps each line and loses each credential."""
    before = server.log_bytes()
    requests = [
        (f"GET /v1/models?api_key={LEAKS[0]}", 401), (f"GET /v1/models?x=1&apikey={LEAKS[1]}&y=2", 401),
        (f"GET /v1/models?%61pi%5Fkey={LEAKS[2]}", 401), (f"GET /v1/models?token={LEAKS[3]}&token={LEAKS[4]}", 401),
        (f"GET /v1/models?Access-Token={LEAKS[5]};Password={LEAKS[6]}", 401), (f"GET /v1/nothing?auth={LEAKS[7]}", 401),
        (f"GET /health?X-Amz-Signature={LEAKS[8]}&X-Amz-Credential={LEAKS[9]}", 200),
        (f"GET /v1/models?client_secret={LEAKS[10]}", 200), (f"GET /v1/models?q={KEY}", 401),
        (f"GET /v1/models?q={KEY.replace('-', '%2D')}", 401), (f"GET /v1/models/{KEY}", 401),
        (f"POST /v1/completions?session_token={LEAKS[11]}", 400),
        (f"GET http://user:{LEAKS[12]}@x/v1/models?key={LEAKS[13]}", None),
    ]
    for index, (line, status) in enumerate(requests):
        authorised = index in (7, 11)  # the right key in the header, which is never logged either
        answer = raw_request(server.port, line, AUTH if authorised else {}, b"{" if line.startswith("POST") else b"")
        assert status is None or answer.startswith(f"HTTP/1.1 {status} ".encode()), (line, answer[:200])
    logged = wait_for_log(server, before, lines=len(requests) - 1)
    assert not [leak for leak in [*LEAKS, KEY, KEY.replace("-", "%2D")] if leak in logged], logged
    assert '"GET /v1/models?api_key=[redacted] HTTP/1.1" 401' in logged
    assert '"GET /v1/models?%61pi%5Fkey=[redacted] HTTP/1.1" 401' in logged
    assert '"GET /v1/models?token=[redacted]&token=[redacted] HTTP/1.1" 401' in logged
    assert '"GET /health?X-Amz-Signature=[redacted]&X-Amz-Credential=[redacted] HTTP/1.1" 200' in logged
    assert '"GET /v1/models?x=1&apikey=[redacted]&y=2 HTTP/1.1" 401' in logged  # other parameters stay


def raw_request(port: int, line: str, headers: dict, body: bytes) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in {**headers, "Content-Length": len(body)}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"{line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def wait_for_log(server, offset: int, lines: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        logged = server.log_path.read_bytes()[offset:].decode()
        if logged.count("uvicorn.access") >= lines or time.monotonic() > deadline:
            return logged
        time.sleep(0.1)


def test_credentials_are_redacted_from_every_log_line():
    """The server's one handler: error lines quoting URLs, header dumps and tracebacks lose credentials too."""
    stream = io.StringIO()
    logger = logging.getLogger("tablefree.test.redaction")
    logger.addHandler(log_handler((KEY,), stream))
    logger.propagate = False
    try:
        logger.error("a request for %s failed", f"http://127.0.0.1/v1/models?api_key={LEAKS[0]}&n=2")
        logger.error("padded: /v1/models?%stoken=%s", "x" * 5000, LEAKS[7])  # a name however long
        logger.warning("headers: %s", [(b"host", b"x"), (b"authorization", f"Bearer {LEAKS[1]}".encode())])
        logger.warning("Authorization: Bearer %s / X-Api-Key: %s / Cookie: session=%s", LEAKS[2], LEAKS[3], LEAKS[4])
        logger.error("the key %s, percent-encoded %s and %s", KEY, KEY.replace("-", "%2D"), KEY.replace("c", "%63"))
        try:
            raise ValueError(f"cannot fetch https://admin:{LEAKS[5]}@example.org/x?%70assword={LEAKS[6]}")
        except ValueError:
            logger.exception("Exception in ASGI application")
    finally:
        logger.handlers.clear()
    text = stream.getvalue()
    assert not [leak for leak in [*LEAKS[:8], KEY, KEY.replace("-", "%2D"), KEY.replace("c", "%63")] if leak in text], text
    assert "api_key=[redacted]&n=2" in text and "(b'authorization', b'[redacted]')" in text
    assert "Traceback" in text and "https://[redacted]@example.org/x?%70assword=[redacted]" in text


# ---- chat errors name chat fields ----
def chat_field_path(param: str, body: dict) -> bool:
    """Whether `param` (messages[0].content, logit_bias, ...) is a path into `body` whose root is a chat field."""
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", param)]
    if not parts or parts[0] not in ChatCompletionRequest.model_fields:
        return False
    node = body
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


CHAT_ERRORS = [  # (body, the param it must name)
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}], "max_tokens": 4}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": CONTEXT}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [1 << 20]}, "stop_token_ids"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(1 << 20): 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "another"}, "model"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages[0].content[0].type"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
]


def test_every_chat_error_names_a_chat_field(server):
    """The errors chat requests meet (over the context, too many tokens asked for, ids outside the vocabulary, what
    the server does not support, a wrong type in each field in turn) name a field that chat requests have."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        def error_param(body: dict) -> str:
            response = http.post("/v1/chat/completions", json=body)
            assert 400 <= response.status_code < 500, (body, response.text)
            named = response.json()["error"]["param"]
            assert named is not None and chat_field_path(named, body), (body, response.text)
            return named

        for body, param in CHAT_ERRORS:
            assert error_param(body) == param, body
        for field in ChatCompletionRequest.model_fields:  # a type no field takes, in each field in turn
            named = error_param({"messages": [{"role": "user", "content": "x"}], field: [[{}]]})
            assert re.fullmatch(rf"{field}(\[0\])*", named), (field, named)
