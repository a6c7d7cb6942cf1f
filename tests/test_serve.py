"""`tablefree serve` driven the way its users drive it: the official openai client, curl, raw HTTP."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from serve_process import CARD_CONTEXT, ServerProcess, serving_model

from tablefree.serve import DEFAULT_ENGINE, ENGINES

MODEL = "MODEL"  # the name the model card's curl command uses
BODY_LIMIT = 4_200_000  # room for the ~4 MB prompts of the event-loop test


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """servers(engine): this module's server with that --engine, started on first use."""
    started: dict[str, ServerProcess] = {}

    def server_with(engine: str) -> ServerProcess:
        if engine not in started:
            started[engine] = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / f"{engine}.log",
                                            "--served-model-name", MODEL, "--max-body-bytes", str(BODY_LIMIT),
                                            "--engine", engine)
        return started[engine]

    yield server_with
    for proc in started.values():  # uvicorn re-raises SIGTERM after draining
        assert proc.stop() in (0, -signal.SIGTERM), proc.log_path.read_text()


@pytest.fixture(scope="module")
def server(servers):
    """The server with the default engine."""
    return servers(DEFAULT_ENGINE)


@pytest.fixture(scope="module", params=ENGINES)
def engine_server(request, servers):
    """The server with each engine in turn: the end-to-end tests of generation run against both."""
    return servers(request.param)


@pytest.fixture(scope="module")
def client(engine_server):
    return openai.OpenAI(base_url=f"{engine_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_model_card_curl_command(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = (
        f'curl -s -X POST "http://localhost:{server.port}/v1/completions" -H "Content-Type: application/json" '
        f'--data \'{{"model": "{MODEL}", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}}\''
    )
    out = subprocess.run(command, shell=True, capture_output=True, text=True, check=True, timeout=600)
    body = json.loads(out.stdout)
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == body["usage"]["total_tokens"]
    assert 1 <= body["usage"]["completion_tokens"] <= 512


def test_completion_n_logprobs_echo(client):
    out = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, n=2, logprobs=3, echo=True, seed=1)
    assert len(out.choices) == 2
    prompt_len = out.usage.prompt_tokens
    for choice in out.choices:
        assert choice.text.startswith("Hello world")
        lp = choice.logprobs
        generated = len(lp.tokens) - prompt_len
        assert 1 <= generated <= 5
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(top[token] == value and 3 <= len(top) <= 4  # the token itself and the 3 likeliest
                   for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]))
        assert "".join(lp.tokens) == choice.text
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) - prompt_len for c in out.choices)


def test_seed_repeats_and_stream_matches(client):
    kwargs = dict(model=MODEL, prompt="The sea", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, extra_body={"top_k": 50})
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == first
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    other = client.completions.create(**{**kwargs, "seed": 99, "max_tokens": 12}).choices[0].text
    assert other != first  # 12 draws over 65,536 ids from another seed coincide with negligible probability


def test_stop_string_and_stop_token_ids(client, engine_server):
    server = engine_server
    greedy = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, logprobs=0)
    text, tokens = greedy.choices[0].text, greedy.choices[0].logprobs.tokens
    assert len(tokens) == 20
    stop = tokens[4] + tokens[5]  # a string the greedy continuation is known to contain
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]
    streamed = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]
    stop_id = httpx.post(f"{server.url}/tokenize", json={"prompt": tokens[3]}).json()["tokens"][0]
    by_id = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert by_id.choices[0].finish_reason == "stop"
    assert by_id.choices[0].text == "".join(tokens[: tokens.index(tokens[3])])


def test_prompt_forms(client, engine_server):
    server = engine_server
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hi there"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=3, n=2)
    assert sorted(c.index for c in many.choices) == list(range(6))
    nested = client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=3, temperature=0)
    assert nested.choices[0].text == by_text.choices[0].text[: len(nested.choices[0].text)]
    assert nested.usage.prompt_tokens == len(ids) + 1


def test_chat(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=3, logprobs=True, top_logprobs=2, n=2)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length")
        assert 1 <= len(choice.logprobs.content) <= 6
        assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=3)
    assert again.choices[0].message.content == out.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_health_metrics_tokenize(client, engine_server):
    server = engine_server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "héllo, wörld"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == CARD_CONTEXT
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "héllo, wörld"
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] >= 3
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("tablefree_requests_total", "tablefree_generation_tokens_total", "tablefree_queue_depth",
                 "tablefree_time_to_first_token_seconds_bucket", "tablefree_request_latency_seconds_bucket"):
        assert name in metrics


def raw(text: str) -> bytes:
    """A JSON body as written by hand: escapes like \\ud800 stay in, as a client may send them."""
    return text.encode()


BAD_BODIES = [
    ("malformed json", b'{"prompt": "x", ', 400),
    ("not an object", b'["prompt"]', 400),
    ("empty body", b"", 400),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', 400),
    ("wrong type", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400),
    ("integer as a string", json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), 400),
    ("integer as a boolean", json.dumps({"prompt": "x", "max_tokens": True}).encode(), 400),
    ("integer as a float", json.dumps({"prompt": "x", "max_tokens": 5.0}).encode(), 400),
    ("boolean as an integer", json.dumps({"prompt": "x", "echo": 1}).encode(), 400),
    ("prompt of wrong type", json.dumps({"prompt": {"a": 1}}).encode(), 400),
    ("lone surrogate in the prompt", raw('{"prompt": "a\\ud800"}'), 400),
    ("lone surrogate in a prompt list", raw('{"prompt": ["ok", "\\udfff"]}'), 400),
    ("lone surrogate in the model name", raw('{"model": "\\ud800", "prompt": "x"}'), 400),
    ("lone surrogate in a stop string", raw('{"prompt": "x", "stop": "\\udc00"}'), 400),
    ("lone surrogate in a logit_bias key", raw('{"prompt": "x", "logit_bias": {"\\ud800": 1}}'), 400),
    ("superscript digit as logit_bias key", json.dumps({"prompt": "x", "logit_bias": {"\u00b2": 1}}).encode(), 400),
    ("non-finite logit_bias", b'{"prompt": "x", "logit_bias": {"1": Infinity}}', 400),
    ("NaN temperature", b'{"prompt": "x", "temperature": NaN}', 400),
    ("overflowing float", b'{"prompt": "x", "top_p": 1e400}', 400),
    ("seed beyond 64 bits", json.dumps({"prompt": "x", "seed": 2**64}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404),
    ("negative max_tokens", json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10**30}).encode(), 400),
    ("prompt over context", json.dumps({"prompt": "word " * (CARD_CONTEXT + 10), "max_tokens": 1}).encode(), 400),
    ("scoring a prompt over context", json.dumps({"prompt": list(range(CARD_CONTEXT + 5)), "max_tokens": 0, "echo": True}).encode(), 400),
    ("ids outside vocab", json.dumps({"prompt": [1, 2, 70000]}).encode(), 400),
    ("huge id", json.dumps({"prompt": [1, 10**30]}).encode(), 400),
    ("negative id", json.dumps({"prompt": [[1, -2]]}).encode(), 400),
    ("n too large", json.dumps({"prompt": "x", "n": 1000}).encode(), 400),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), 400),
    ("empty id list", json.dumps({"prompt": []}).encode(), 400),
    ("temperature out of range", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
    ("empty stop string", json.dumps({"prompt": "x", "stop": [""]}).encode(), 400),
    ("stop id outside vocab", json.dumps({"prompt": "x", "stop_token_ids": [1 << 20]}).encode(), 400),
    ("body over the limit", json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode(), 413),
]


@pytest.mark.parametrize("name,body,status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_and_the_server_stays_up(server, name, body, status):
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_errors_name_the_field(server):
    cases = [
        ("/v1/completions", raw('{"prompt": ["ok", "\\ud800"]}'), "prompt[1]", "lone surrogate U+D800"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), "max_tokens", "integer"),
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"\u00b2": 1}}).encode(), "logit_bias.\u00b2", "decimal"),
        ("/v1/completions", json.dumps({"prompt": "x", "stop": ["a", ""]}).encode(), "stop[1]", "must not be empty"),
        ("/v1/chat/completions", raw('{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}'),
         "messages[0].content[0].text", "lone surrogate U+DC00"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}).encode(),
         "logprobs", "boolean"),
        ("/tokenize", raw('{"prompt": "\\ud800"}'), "prompt", "lone surrogate"),
        ("/detokenize", json.dumps({"tokens": [1, "2"]}).encode(), "tokens[1]", "integer"),
    ]
    for path, body, param, words in cases:
        response = httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_errors_outside_the_routes_are_json(server):
    """Wrong paths and methods, a wrong content type and malformed HTTP all get the same JSON error object."""
    responses = [httpx.get(f"{server.url}/v1/nothing"), httpx.get(f"{server.url}/v1/completions"),
                 httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["message"] == "malformed HTTP/1.1 request"
    assert [r.status_code for r in responses] == [404, 405, 400]
    for response in responses:
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_every_chat_role_has_a_defined_rendering(server):
    def ids(**body):
        response = httpx.post(f"{server.url}/tokenize", json=body)
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    def special(token):
        [token_id] = ids(prompt=token, add_special_tokens=False)
        return token_id

    text = ids(prompt="hello", add_special_tokens=False)
    rendered = {role: ids(messages=[{"role": role, "content": "hello"}]) for role in
                ("system", "developer", "user", "assistant", "tool", "function")}
    reply = special("[ASSISTANT]")
    assert rendered["system"] == rendered["developer"] == text + ids(prompt="\n", add_special_tokens=False) + [reply]
    assert rendered["user"] == [special("[USER]"), *text, special("[EOT]"), reply]
    assert rendered["assistant"] == [reply, *text, special("[EOT]"), reply]
    assert rendered["tool"] == rendered["function"] == [special("<tool_response>"), *text, special("</tool_response>"), reply]
    unknown = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "ipython", "content": "x"}]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "messages[0].role"


def test_tokenize_matches_the_tokenizer(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.model))
    for text in ("Hello, world", "héllo [USER] </s> <tool_response> \U0001F600 x", " \n\t ", "a" * 5000):
        for special in (True, False):
            served = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": special}).json()
            assert served["tokens"] == tokenizer.encode(text, add_special_tokens=special)
            assert served["count"] == len(served["tokens"])


def test_health_answers_while_large_prompts_are_tokenised(server):
    """Three ~4 MB prompts (tokenised off the event loop) leave /health answering; on the loop it waited seconds."""
    prompt = ("The quick brown fox jumps over the lazy dog. " * 90_000)[:3_900_000]
    bodies = [json.dumps({"prompt": prompt, "max_tokens": 1}).encode()] * 2
    bodies.append(json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}).encode())
    paths = ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
    statuses: list[int] = []

    def send(path, body):
        statuses.append(httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"},
                                   timeout=300).status_code)

    senders = [threading.Thread(target=send, args=pair) for pair in zip(paths, bodies)]
    for sender in senders:
        sender.start()
    answered = 0
    with httpx.Client(base_url=server.url, timeout=1.0) as probe:  # liveness bound, generous against the 100 ms aim
        while any(sender.is_alive() for sender in senders):
            assert probe.get("/health").status_code == 200
            answered += 1
            time.sleep(0.02)
    for sender in senders:
        sender.join()
    assert statuses == [400, 400, 400]  # over the context: the ids were counted, never built
    assert answered >= 5


def test_bad_chat_input(server):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]}, {"messages": "hi"},
                 {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
                 {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}):
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{server.url}/v1/completions").status_code == 405


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation(engine_server, stream):
    server = engine_server
    before = metric(server, "tablefree_generation_tokens_total")
    body = {"prompt": "x", "max_tokens": CARD_CONTEXT - 10, "stream": stream, "ignore_eos": True}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric(server, "tablefree_running_sequences") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "tablefree_running_sequences") == 0
    assert metric(server, "tablefree_generation_tokens_total") - before < CARD_CONTEXT - 10  # stopped early, not run to max_tokens


@pytest.mark.slow
def test_stock_gpt_neox_export_serves_the_same_text(server, tmp_path):
    """Any causal LM directory serves with --trust-remote-code; the GPT-NeoX export answers like the original."""
    neox = tmp_path / "neox"
    subprocess.run([sys.executable, "-m", "tablefree.cli", "export", str(server.model), str(neox),
                    "--format", "gpt-neox"], check=True, capture_output=True)
    other = ServerProcess(neox, tmp_path / "neox.log", "--trust-remote-code", "--served-model-name", MODEL)
    try:
        body = {"model": MODEL, "prompt": "Once upon a time,", "max_tokens": 16, "temperature": 0}
        ours = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        theirs = httpx.post(f"{other.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert theirs == ours
    finally:
        other.stop()


# ---- the protocol types, in process and on the wire ----
def test_sampling_params_take_the_request_then_the_server_then_openai():
    from tablefree.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

    server = SamplingFields.model_validate({"seed": 7, "temperature": 0.3, "stop": "END"})
    context = {"vocab_size": 100, "max_model_len": 50, "defaults": server}
    plain = CompletionRequest.model_validate({"prompt": "x"}).sampling_params(10, **context)
    assert (plain.seed, plain.temperature, plain.stop) == (7, 0.3, ["END"])  # the server's, where the request is silent
    assert (plain.top_p, plain.top_k, plain.max_tokens, plain.logprobs) == (1.0, -1, 16, None)  # OpenAI's
    own = CompletionRequest.model_validate({"prompt": "x", "seed": 1, "temperature": 0.9, "stop": None}).sampling_params(
        10, **context)
    assert (own.seed, own.temperature, own.stop) == (1, 0.9, [])  # the request's own, even an explicit null
    unseeded = CompletionRequest.model_validate({"prompt": "x", "seed": None}).sampling_params(10, **context)
    assert unseeded.seed is None
    assert CompletionRequest.model_validate({"prompt": "x"}).sampling_params(10, **{**context, "defaults": SamplingFields()}).seed is None
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                                                 "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2})
    params = chat.sampling_params(10, **context)
    assert (params.max_tokens, params.logprobs, params.seed) == (4, 2, 7)
    room = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]}).sampling_params(10, **context)
    assert room.max_tokens == 40 and room.logprobs is None  # chat without max_tokens: the rest of the context
    scoring = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert scoring.sampling_params(10, **context).prompt_logprobs


def test_sampling_params_refuse_what_the_model_cannot_take():
    from tablefree.serve.protocol import APIError, CompletionRequest, SamplingFields

    context = {"vocab_size": 100, "max_model_len": 50, "defaults": SamplingFields()}
    cases = [({"logit_bias": {"100": 1}}, 10, "logit_bias"), ({"stop_token_ids": [100]}, 10, "stop_token_ids"),
             ({"max_tokens": 41}, 10, "max_tokens"), ({"max_tokens": 0}, 10, "max_tokens"),
             ({"max_tokens": 1}, 50, "prompt"), ({}, 0, "prompt"),
             ({"logit_bias": {"9" * 40: 1}}, 10, "logit_bias")]
    for fields, prompt_tokens, param in cases:
        with pytest.raises(APIError) as refused:
            CompletionRequest.model_validate({"prompt": "x", **fields}).sampling_params(prompt_tokens, **context)
        assert refused.value.status == 400 and refused.value.param == param, fields


def test_every_body_on_the_wire_is_its_protocol_type(engine_server):
    server = engine_server
    from tablefree.serve.protocol import (ChatCompletion, ChatCompletionChunk, Completion, DetokenizeResponse, ErrorResponse,
                                          Health, ModelList, TokenizeResponse)

    def events(path, body):
        with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as response:
            lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    completion = {"prompt": ["Hi", "there"], "max_tokens": 3, "n": 2, "logprobs": 2, "echo": True, "seed": 5}
    Completion.model_validate(httpx.post(f"{server.url}/v1/completions", json=completion, timeout=120).json(), strict=True)
    chunks = events("/v1/completions", {**completion, "stream_options": {"include_usage": True}})
    assert all(Completion.model_validate(c, strict=True) for c in chunks) and chunks[-1]["usage"]["completion_tokens"] >= 4
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2, "logprobs": True, "top_logprobs": 1}
    ChatCompletion.model_validate(httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120).json(), strict=True)
    assert all(ChatCompletionChunk.model_validate(c, strict=True) for c in events("/v1/chat/completions", chat))
    ModelList.model_validate(httpx.get(f"{server.url}/v1/models").json(), strict=True)
    Health.model_validate(httpx.get(f"{server.url}/health").json(), strict=True)
    TokenizeResponse.model_validate(httpx.post(f"{server.url}/tokenize", json={"prompt": "Hi"}).json(), strict=True)
    DetokenizeResponse.model_validate(httpx.post(f"{server.url}/detokenize", json={"tokens": [72]}).json(), strict=True)
    ErrorResponse.model_validate(httpx.post(f"{server.url}/v1/completions", json={"prompt": 1}).json(), strict=True)


def test_the_openapi_schema_documents_every_response_body(server):
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    expected = {("/v1/completions", "post"): "Completion", ("/v1/chat/completions", "post"): "ChatCompletion",
                ("/v1/models", "get"): "ModelList", ("/health", "get"): "Health", ("/tokenize", "post"): "TokenizeResponse",
                ("/detokenize", "post"): "DetokenizeResponse"}
    for (path, method), name in expected.items():
        responses = paths[path][method]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}, path
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_completion_and_chat_rendering_each_give_ids(tmp_path_factory):
    import asyncio

    from transformers import AutoTokenizer

    from tablefree.serve.app import TextWorker
    from tablefree.serve.chat_template import ChatTemplate
    from tablefree.serve.protocol import APIError, ChatMessage

    tokenizer = AutoTokenizer.from_pretrained(str(serving_model(tmp_path_factory)))
    text = TextWorker(tokenizer, ChatTemplate(tokenizer, limit=1 << 20))
    hi, long = tokenizer.encode("Hi"), "Hello there, how are you today? Fine, thanks."
    assert len(tokenizer.encode(long)) > 4
    messages = [ChatMessage(role="user", content=[{"type": "text", "text": "H"}, {"type": "text", "text": "i"}])]

    async def render():
        forms = [await text.completion_prompts(prompt, limit=4) for prompt in ("Hi", ["Hi", long], [5, 6], [[5], [6, 7]])]
        return forms, await text.chat(messages, True)

    try:
        forms, chat = asyncio.run(render())
        assert [[tuple(p) for p in form] for form in forms] == [
            [(hi, len(hi))], [(hi, len(hi)), (None, len(tokenizer.encode(long)))],  # over the limit: counted only
            [([5, 6], 2)], [([5], 1), ([6, 7], 2)]]
        assert chat.ids == tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
        text.chat_template = None
        with pytest.raises(APIError) as refused:
            asyncio.run(text.chat(messages, True))
        assert refused.value.param == "messages" and "no chat template" in refused.value.message
    finally:
        text.close()


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_top_logprobs_hold_the_sampled_token_even_outside_the_top_k(client, stream):
    """As vLLM: completions list the sampled token and the k likeliest (k + 1 when it is not among them), chat the
    first k of that list (the sampled token first). A logit_bias forces a token that logprobs, the model's own, rank low."""
    forced = {"logit_bias": {"90": 100}, "max_tokens": 4, "temperature": 0, "stream": stream}
    completion = client.completions.create(model=MODEL, prompt="Hello", logprobs=2, **forced)
    chunks = list(completion) if stream else [completion]
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    tops = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.top_logprobs]
    assert tokens == ["Z"] * 4
    for value, top in zip(values, tops):
        assert len(top) == 3 and top["Z"] == value and sorted(top.values())[0] == value
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                          top_logprobs=2, **forced)
    chunks = list(chat) if stream else [chat]
    content = [item for c in chunks for ch in c.choices if ch.logprobs for item in ch.logprobs.content]
    assert [item.token for item in content] == ["Z"] * 4
    for item in content:
        assert len(item.top_logprobs) == 2 and (item.top_logprobs[0].token, item.top_logprobs[0].logprob) == ("Z", item.logprob)
        assert item.top_logprobs[1].logprob > item.logprob


def queued(server) -> float:
    return metric(server, "tablefree_queue_depth")


def test_health_answers_while_a_huge_echo_body_is_built(engine_server):
    """4 prompts of 1,024 ids, n=16, echo, logprobs 20, max_tokens 0 make a ~34 MB body. It is
    built and encoded off the event loop, so /health keeps answering (it waited 3.5 s), and a small request queued
    after it finishes first (each prompt is scored once, not once per choice, and one request holds half the batch)."""
    server = engine_server
    prompts = [[0x4E00 + (p * 1000 + i * 31) % 20000 for i in range(CARD_CONTEXT)] for p in range(4)]
    big = {"model": MODEL, "prompt": prompts, "n": 16, "best_of": 16, "echo": True, "logprobs": 20, "max_tokens": 0}
    done: dict[str, float] = {}
    responses: dict[str, httpx.Response] = {}

    def send(name: str, body: dict):
        responses[name] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)
        done[name] = time.monotonic()

    senders = [threading.Thread(target=send, args=("big", big))]
    senders[0].start()
    while queued(server) == 0 and senders[0].is_alive():
        time.sleep(0.01)
    senders.append(threading.Thread(target=send, args=("small", {"model": MODEL, "prompt": "Hi", "max_tokens": 8,
                                                                 "temperature": 0, "ignore_eos": True})))
    senders[1].start()
    answered = 0
    with httpx.Client(base_url=server.url, timeout=1.0) as probe:  # liveness bound, as for large prompts above
        while senders[0].is_alive():
            assert probe.get("/health").status_code == 200
            answered += 1
            time.sleep(0.02)
    for sender in senders:
        sender.join()
    assert responses["big"].status_code == 200 and responses["small"].status_code == 200
    assert done["small"] < done["big"] and answered >= 5
    choices = responses["big"].json()["choices"]
    assert len(choices) == 64 and all(len(c["logprobs"]["tokens"]) == CARD_CONTEXT for c in choices)
    for choice in choices[::16]:
        lp = choice["logprobs"]
        assert all(top[token] == value and len(top) in (20, 21)
                   for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]))


def test_greedy_text_is_generates_alone_and_batched(engine_server):
    """Greedy completions equal `tablefree generate`'s text, alone and sharing forward passes with others."""
    import asyncio
    import io

    from tablefree.generate import generate_text

    prompts = ["Once upon a time,", "The sea", "abc", "Question: What is a list?\nAnswer:"]
    expected = [generate_text(str(engine_server.model), p, max_tokens=12, ignore_eos=True, stream=io.StringIO())
                for p in prompts]
    body = lambda p: {"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}  # noqa: E731

    async def together():
        async with httpx.AsyncClient(base_url=engine_server.url, timeout=120) as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json=body(p)) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in replies]

    alone = [httpx.post(f"{engine_server.url}/v1/completions", json=body(p), timeout=120).json()["choices"][0]["text"]
             for p in prompts]
    assert alone == expected
    assert asyncio.run(together()) == expected
