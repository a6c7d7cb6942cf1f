"""The server under load, fuzzing, a full queue, a wrong API key, hostile connections and SIGTERM: it stays up,
answers 4xx (never 5xx) with a JSON error, holds its resources, and `tablefree serve` never prints a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import json
import logging
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from serve_process import ServerProcess, serving_model

from tablefree.cli import main
from tablefree.errors import TableFreeError
from tablefree.serve import ENGINES
from tablefree.serve import add_cli as add_serve_cli
from tablefree.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, printable
from tablefree.serve.server import RepeatFilter, resolve_api_key

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CONNECTIONS = 16
OPEN_FILES = 400  # low enough that a few hundred sockets would exhaust it without the connection bound


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    """Short context, tiny batch and queue, an API key (from the environment), short connection timeouts, few
    connections and a low open-file limit: every bound is easy to reach."""
    model = serving_model(tmp_path_factory)
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "strict.log", "--max-model-len", "64",
                         "--max-batch-size", "2", "--max-queue", "4", "--max-body-bytes", "65536",
                         "--timeout-keep-alive", "2", "--request-read-timeout", "3",
                         "--max-connections", str(MAX_CONNECTIONS),
                         env={"TABLEFREE_API_KEY": KEY}, open_files=OPEN_FILES)
    yield proc
    assert proc.stop() in (0, -signal.SIGTERM), proc.log_path.read_text()


def test_api_key_required(strict_server):
    body = {"prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{strict_server.url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{strict_server.url}/v1/models").status_code == 401
    assert httpx.post(f"{strict_server.url}/v1/completions", json=body, headers=AUTH).status_code == 200
    assert httpx.get(f"{strict_server.url}/health").status_code == 200  # probes need no key


def test_full_queue_is_503_with_retry_after(strict_server):
    url = f"{strict_server.url}/v1/completions"
    body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "n": 4}

    async def flood():
        # 12 x 4 sequences at once against a batch of 2 and a queue of 4: most must be turned away.
        async with httpx.AsyncClient(headers=AUTH, timeout=300) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(12)))

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["message"]
    assert all(len(r.json()["choices"]) == 4 for r in responses if r.status_code == 200)
    too_many = httpx.post(url, json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}, headers=AUTH)
    assert too_many.status_code == 400  # 6 sequences could never fit a queue of 4: not a retry case


@pytest.mark.parametrize("mode,examples", [(GenerationMode.NEGATIVE, 25), (GenerationMode.POSITIVE, 8)])
def test_fuzz_openapi_schema_never_5xx(strict_server, mode, examples):
    fuzz(strict_server, mode, examples)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.NEGATIVE, GenerationMode.POSITIVE])
def test_fuzz_openapi_schema_never_5xx_long(strict_server, mode):
    fuzz(strict_server, mode, 150)


def fuzz(strict_server, mode, examples: int) -> None:
    schema = schemathesis.openapi.from_url(f"{strict_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    with httpx.Client(base_url=strict_server.url, headers=AUTH, timeout=120) as client:
        for operation in operations:
            if mode == GenerationMode.NEGATIVE and operation.method.lower() == "get":
                continue  # nothing to make invalid: these routes take no input

            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                kwargs = case.as_transport_kwargs(base_url=strict_server.url)
                response = client.request(kwargs["method"], kwargs["url"], headers={**(kwargs.get("headers") or {}), **AUTH},
                                          params=kwargs.get("params"), json=kwargs.get("json"), content=kwargs.get("data"))
                assert response.status_code < 500, (case.body, response.text)
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
    assert httpx.get(f"{strict_server.url}/health").status_code == 200


def test_load_500_requests_at_concurrency_32(tmp_path_factory):
    """Zero failures, and memory stays bounded: RSS after 500 more requests is within a fixed margin."""
    model = serving_model(tmp_path_factory)
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "load.log", "--max-batch-size", "32")
    try:
        asyncio.run(_load(proc.url, 64, 32))  # warm up: allocator pools and caches reach their working size
        before = proc.rss_bytes()
        statuses = asyncio.run(_load(proc.url, 500, 32))
        after = proc.rss_bytes()
        assert statuses == {200: 500}
        assert after - before < 150 * 2**20, f"RSS grew {(after - before) / 2**20:.0f} MiB over 500 requests"
    finally:
        assert proc.stop() in (0, -signal.SIGTERM), proc.log_path.read_text()


async def _load(url: str, total: int, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    queue = list(range(total))

    async def worker(client):
        while queue:
            i = queue.pop()
            if i % 3 == 0:
                body = {"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4, "stream": i % 2 == 0}
                path = "/v1/chat/completions"
            else:
                body = {"prompt": f"prompt number {i}", "max_tokens": 4, "temperature": 0.7, "stream": i % 2 == 0}
                path = "/v1/completions"
            response = await client.post(path, json=body)
            if body["stream"]:
                assert response.text.rstrip().endswith("data: [DONE]")
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses


def test_sigterm_drains_in_flight_requests(tmp_path_factory):
    model = serving_model(tmp_path_factory)
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "drain.log")
    lines: list[str] = []
    first = threading.Event()

    def stream():
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(120)
    code = proc.stop()  # SIGTERM while the stream is in flight
    reader.join(timeout=300)
    assert code in (0, -signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    finishes = [line for line in lines if '"finish_reason": "length"' in line]
    assert len(finishes) == 1, "the in-flight request ran to its max_tokens before the server exited"


def test_stream_events_survive_line_separator_characters_in_the_text():
    import json

    from tablefree.serve.responses import _sse

    text = "a\u2028b\x85c\u2029d\x0be\rf\ng"
    event = _sse({"choices": [{"text": text}]})
    body = event[len("data: ") : -2]
    assert event.endswith("\n\n") and body.splitlines() == [body]  # one line for every line-splitting rule
    assert json.loads(body)["choices"][0]["text"] == text


# ---- the API key never needs the command line ----
def test_api_key_is_not_in_the_process_list(strict_server):
    assert KEY.encode() not in Path(f"/proc/{strict_server.process.pid}/cmdline").read_bytes()


def test_api_key_sources_and_their_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("TABLEFREE_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")

    def key(api_key=None, api_key_file=None):
        return resolve_api_key(argparse.Namespace(api_key=api_key, api_key_file=api_key_file))

    assert key() is None
    monkeypatch.setenv("TABLEFREE_API_KEY", "from-env")
    assert key() == "from-env"
    assert key(api_key="from-flag") == "from-flag"
    assert key(api_key_file=str(key_file)) == "from-file"
    for bad, words in [({"api_key": "a", "api_key_file": str(key_file)}, "not both"), ({"api_key": ""}, "empty"),
                       ({"api_key": "two words"}, "printable ASCII"), ({"api_key_file": str(tmp_path / "none")}, "cannot read"),
                       ({"api_key_file": str(tmp_path)}, "cannot read")]:
        with pytest.raises(TableFreeError, match=words):
            key(**bad)
    key_file.write_bytes(b"k" * 5000)
    with pytest.raises(TableFreeError, match="over 4096 bytes"):
        key(api_key_file=str(key_file))
    monkeypatch.setenv("TABLEFREE_API_KEY", "  ")
    with pytest.raises(TableFreeError, match="TABLEFREE_API_KEY gives an empty API key"):
        key()


# ---- connections ----
def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (whatever it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def closed_now(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_connection_that_never_sends_a_request_is_closed(strict_server):
    with connect(strict_server) as sock:
        assert closed_within(sock, 30)  # --timeout-keep-alive 2; uvicorn alone never closes it


def test_a_request_head_trickling_in_is_closed(strict_server):
    """Slowloris: a header byte every 0.2 s keeps the idle timer from firing; the read deadline (3 s) still does."""
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < 30:
            try:
                sock.sendall(b"X-Slow: y\r\n"[int(time.monotonic() * 5) % 11:][:1])
            except OSError:  # the server closed: writes fail with a broken pipe or a reset
                closed = True
            closed = closed or closed_within(sock, 0.2)
        assert closed


def test_a_request_body_stalling_is_closed(strict_server):
    with connect(strict_server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        assert closed_within(sock, 30)
    assert httpx.get(f"{strict_server.url}/health").status_code == 200


def test_connections_over_the_limit_are_closed_on_arrival_and_nothing_floods_the_log(strict_server):
    """600 sockets against a limit of 16 connections and 400 open files: the extra ones are closed at once, the
    server never reaches its file limit (where asyncio logs every failed accept), and it answers afterwards."""
    log_before = strict_server.log_bytes()
    sockets = [connect(strict_server) for _ in range(600)]
    try:
        time.sleep(1.0)  # under the 2 s idle timeout: only the bound closes connections by now
        assert sum(closed_now(sock) for sock in sockets) >= len(sockets) - MAX_CONNECTIONS
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    assert httpx.get(f"{strict_server.url}/health").status_code == 200
    logged = strict_server.log_path.read_bytes()[log_before:].decode()
    assert "out of system resource" not in logged and logged.count("--max-connections") <= 1, logged[:2000]
    assert len(logged) < 10_000


def test_a_repeated_log_message_is_written_once_per_window_with_a_count():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter(window=0.5))
    logger = logging.getLogger("tablefree.test.repeats")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(5000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.exception("socket.accept() out of system resource")
        logger.error("another message")
        time.sleep(0.6)
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("socket.accept() out of system resource") == 2 and text.count("Traceback") == 1
    assert "another message" in text and "[4999 more like this in the last 0.5 s were not logged]" in text


# ---- every field of every endpoint, with hostile values ----
def full_bodies(model: str) -> dict[str, dict]:
    """One valid body per endpoint that sets every field its request model declares (checked below)."""
    sampling = {"model": model, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.01, "n": 1, "stop": ["zz", "yy"],
                "stop_token_ids": [5], "stream": False, "stream_options": {"include_usage": True}, "seed": 1,
                "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1, "logit_bias": {"5": 1.0},
                "ignore_eos": False, "skip_special_tokens": True, "user": "someone"}
    messages = [{"role": "system", "content": "Be brief.", "name": "rules"},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "me"}]
    return {
        "/v1/completions": {**sampling, "prompt": "Hello", "max_tokens": 2, "logprobs": 1, "echo": False, "best_of": 1,
                            "suffix": ""},
        "/v1/chat/completions": {**sampling, "messages": messages, "max_tokens": 2, "max_completion_tokens": 2,
                                 "logprobs": True, "top_logprobs": 1, "add_generation_prompt": True, "tools": [],
                                 "response_format": {"type": "text"}},
        "/tokenize": {"model": model, "prompt": "Hello", "messages": messages, "add_special_tokens": True},
        "/detokenize": {"model": model, "tokens": [72, 105]},
    }


REQUEST_MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                  "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def paths_in(value, path=()):
    """Every place in a JSON value: (path, is_key) for each value and each dict key."""
    yield path, False
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), True
            yield from paths_in(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_in(item, (*path, index))


def replaced(body, path, is_key: bool, value):
    if not path:
        return value
    body = copy.deepcopy(body)
    parent = body
    for part in path[:-1]:
        parent = parent[part]
    if is_key:
        parent[value if isinstance(value, str) else json.dumps(value)] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return body


def param_of(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return printable(text)


def post(client, path, body) -> httpx.Response:
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \\udXXX escapes, NaN as NaN
    response = client.post(path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code < 500, (path, content[:300], response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json", response.text[:300]
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text[:300]
    return response


def served_name(server) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"]


def test_full_bodies_set_every_declared_field_and_are_accepted(strict_server):
    bodies = full_bodies(served_name(strict_server))
    with httpx.Client(base_url=strict_server.url, timeout=120) as client:
        for path, body in bodies.items():
            assert set(body) == set(REQUEST_MODELS[path].model_fields), path
            assert post(client, path, body).status_code == 200


def test_a_lone_surrogate_in_any_string_of_any_endpoint_is_a_400_naming_it(strict_server):
    """Every string value of every endpoint's full body, and every logit_bias key, in turn."""
    bodies = full_bodies(served_name(strict_server))
    hostile = "a\ud800b"
    checked = 0
    with httpx.Client(base_url=strict_server.url, timeout=120) as client:
        for endpoint, body in bodies.items():
            for path, is_key in paths_in(body):
                text_value = not is_key and isinstance(value_at(body, path), str)
                if not (text_value or is_key and path[:-1] == ("logit_bias",)):
                    continue
                response = post(client, endpoint, replaced(body, path, is_key, hostile))
                assert response.status_code == 400, (endpoint, path, response.text)
                error = response.json()["error"]
                if path[0] == "response_format":  # a free-form object: the error names the field that holds it
                    assert error["param"] == "response_format", error
                else:
                    assert error["param"] == param_of((*path[:-1], hostile) if is_key else path), (endpoint, path, error)
                checked += 1
    assert checked >= 25


def value_at(body, path):
    for part in path:
        body = body[part]
    return body


HOSTILE = st.one_of(
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
              st.text(max_size=4)),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 1e308, -1e308, 5e-324,
                     -0.0, 0.5, 1.5, float("nan"), float("inf"), float("-inf")]),
    st.sampled_from([None, True, False, "5", "", "true", [], {}, [None], [[]], {"a": 1}, "x" * 20_000, [0] * 2000]),
    st.integers(), st.floats(), st.text(max_size=20),
)


def json_kind(value) -> str:
    kinds = ((None.__class__, "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"))
    return next((name for cls, name in kinds if isinstance(value, cls)), "object")


def must_refuse(path, before, after) -> bool:
    """Whether putting `after` where `before` was changes a JSON type the field does not take (strict types)."""
    if path and path[0] in ("tools", "response_format"):  # free-form objects
        return False
    old, new = json_kind(before), json_kind(after)
    if path and path[-1] in ("prompt", "stop", "content"):  # a text, or a list
        return new not in ("string", "array", "null")
    return old != new and new != "null" and not (old == "number" and new == "integer")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_fuzz_every_field_with_hostile_values_never_5xx(strict_server, data):
    """Wrong JSON types, numbers at their extremes and lone surrogates, put anywhere in a full body (keys too): never a
    5xx, always a JSON error; and a single value of a type its field does not take is a 400 (no "5" for 5)."""
    endpoint, body = data.draw(st.sampled_from(sorted(full_bodies(served_name(strict_server)).items())))
    changes = []
    for _ in range(data.draw(st.integers(1, 3))):
        path, is_key = data.draw(st.sampled_from(list(paths_in(body))))
        value = data.draw(HOSTILE)
        changes.append((path, is_key, value_at(body, path), value))
        body = replaced(body, path, is_key, value)
    with httpx.Client(base_url=strict_server.url, timeout=120) as client:
        response = post(client, endpoint, body)
    [(path, is_key, before, after)] = changes if len(changes) == 1 else [((), True, None, None)]
    if not is_key and must_refuse(path, before, after):
        assert response.status_code == 400, (endpoint, path, before, after, response.text[:300])


# ---- shutdown ----
@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_closes_a_stream_nobody_reads(tmp_path_factory, engine):
    """The client asks for ~15 MB of events and never reads: after --shutdown-timeout the server closes it and exits."""
    model = serving_model(tmp_path_factory)
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "unread.log", "--shutdown-timeout", "2", "--engine", engine)
    body = json.dumps({"prompt": "x", "max_tokens": 1000, "n": 16, "logprobs": 20, "stream": True, "ignore_eos": True})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", proc.port))
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        time.sleep(2)  # generation under way; the reply is far from finished
        proc.process.send_signal(signal.SIGTERM)
        try:
            code = proc.process.wait(timeout=90)
        except Exception:
            proc.process.kill()
            raise
        assert code in (0, -signal.SIGTERM), proc.log_path.read_text()[-3000:]
    finally:
        sock.close()
        proc.stop()


# ---- the command line ----
@pytest.fixture
def busy_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `tablefree ARGV` in this process, its streams encoded as the interpreter's
    are (stderr escapes lone surrogates, stdout refuses them)."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            code = exit_.code
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def one_line_error(out: str, err: str) -> str:
    assert "serving" not in out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_busy_port_is_a_one_line_error_before_the_model_loads(tmp_path_factory, busy_port):
    code, out, err = run_cli(["serve", str(serving_model(tmp_path_factory)), "--port", str(busy_port)])
    line = one_line_error(out, err)  # one line: no model-loading progress either
    assert code == 2 and line == f"error: port {busy_port} on 127.0.0.1 is already in use; stop what listens there or choose another --port"


@pytest.mark.parametrize("flags,words", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--port", "-1"], "--port must be between 0 and 65535"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["--max-queue", "-3"], "--max-queue must be at least 1"),
    (["--max-body-bytes", "-5"], "--max-body-bytes must be at least 1"),
    (["--max-model-len", "1"], "--max-model-len must be at least 2"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--draft-tokens", "-1"], "--draft-tokens must be at least 0"),
    (["--max-connections", "100000000"], "ulimit -n"),
    (["--threads", "0"], "--threads must be between 1 and 1024"),
    (["--seed", str(2**64)], "--seed must be in"),
    (["--timeout-keep-alive", "nan"], "--timeout-keep-alive must be a finite number"),
    (["--request-read-timeout", "0"], "--request-read-timeout must be a finite number"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a finite number"),
    (["--shutdown-timeout", "inf"], "--shutdown-timeout must be a finite number"),
    (["--device", "tpu"], "unknown --device"),
    (["--dtype", "int8"], "unknown --dtype"),
    (["--host", "no such host!"], "--host"),
    (["--served-model-name", ""], "--served-model-name"),
    (["--api-key", ""], "empty API key"),
    (["--api-key-file", "/nonexistent/key"], "cannot read --api-key-file"),
])
def test_serve_flags_are_checked_before_the_model_loads(tmp_path_factory, busy_port, flags, words):
    code, out, err = run_cli(["serve", str(serving_model(tmp_path_factory)), "--port", str(busy_port), *flags])
    assert code == 2 and words in one_line_error(out, err)


def serve_flags() -> list[str]:
    subparsers = argparse.ArgumentParser().add_subparsers()
    add_serve_cli(subparsers)
    return sorted(option for action in subparsers.choices["serve"]._actions for option in action.option_strings
                  if option.startswith("--"))


ARGUMENT = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "0", "-1", "1", "65535", "65536", "nan", "inf", "-inf", "1e400", "auto", "cpu", "cuda", "cuda:7",
                     "float16", "int8", "0.0.0.0", "::1", "localhost", "256.1.1.1", "-", "--", "=", "\x00", "\udc80"]),
    st.text(max_size=12),
)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_random_serve_arguments_never_print_a_traceback(tmp_path, busy_port, monkeypatch, data):
    """Random flags and values with the port held busy and no model at the path: argparse's usage error or one
    `error:` line, never a traceback (and never a server)."""
    monkeypatch.delenv("TABLEFREE_API_KEY", raising=False)
    flags = serve_flags()
    argv = ["serve", str(tmp_path / "no-model"), "--port", str(busy_port)]
    for _ in range(data.draw(st.integers(0, 4))):
        flag = data.draw(st.sampled_from(flags + ["--bogus"]))
        argv += [flag] if flag in ("--trust-remote-code", "--help") else [flag, data.draw(ARGUMENT)]
    if data.draw(st.booleans()):
        argv.insert(data.draw(st.integers(1, len(argv))), data.draw(ARGUMENT))
    code, out, err = run_cli(argv)
    if "usage:" in err or code == 0:  # argparse: a usage error, or --help
        assert code in (0, 2) and "Traceback" not in err, (argv, err)
    else:
        assert code == 2, (argv, err)
        one_line_error(out, err)
