"""`tablefree serve` driven the way its users drive it: the official openai client, curl, raw HTTP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from serve_process import CARD_CONTEXT, ServerProcess, serving_model

MODEL = "MODEL"  # the name the model card's curl command uses


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = serving_model(tmp_path_factory)
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "serve.log", "--served-model-name", MODEL,
                         "--max-body-bytes", "200000")
    yield proc
    assert proc.stop() in (0, -signal.SIGTERM), proc.log_path.read_text()  # uvicorn re-raises SIGTERM after draining


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


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
        assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
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


def test_stop_string_and_stop_token_ids(client, server):
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


def test_prompt_forms(client, server):
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


def test_models_health_metrics_tokenize(client, server):
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


BAD_BODIES = [
    ("malformed json", b'{"prompt": "x", ', 400),
    ("not an object", b'["prompt"]', 400),
    ("wrong type", json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400),
    ("prompt of wrong type", json.dumps({"prompt": {"a": 1}}).encode(), 400),
    ("unknown model", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404),
    ("negative max_tokens", json.dumps({"prompt": "x", "max_tokens": -5}).encode(), 400),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400),
    ("prompt over context", json.dumps({"prompt": "word " * (CARD_CONTEXT + 10), "max_tokens": 1}).encode(), 400),
    ("ids outside vocab", json.dumps({"prompt": [1, 2, 70000]}).encode(), 400),
    ("negative id", json.dumps({"prompt": [[1, -2]]}).encode(), 400),
    ("n too large", json.dumps({"prompt": "x", "n": 1000}).encode(), 400),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), 400),
    ("empty id list", json.dumps({"prompt": []}).encode(), 400),
    ("temperature out of range", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
    ("empty stop string", json.dumps({"prompt": "x", "stop": [""]}).encode(), 400),
    ("stop id outside vocab", json.dumps({"prompt": "x", "stop_token_ids": [1 << 20]}).encode(), 400),
    ("body over the limit", json.dumps({"prompt": "x" * 300_000}).encode(), 413),
]


@pytest.mark.parametrize("name,body,status", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_and_the_server_stays_up(server, name, body, status):
    response = httpx.post(f"{server.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


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
def test_disconnect_stops_generation(server, stream):
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
