"""`tablefree serve --engine process`: the engine in a process of its own, and what happens when either process dies.

A fault in one request fails that request alone with either engine; a killed engine process fails the requests it was
serving with a 500 naming its death and stops the server (exit status 2, one error line); a killed server takes its
engine process with it; SIGINT to the whole process group (a terminal's Ctrl-C) or SIGTERM stop both cleanly; a model
that fails to load is the same one-line error with either engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from serve_process import ServerProcess, serving_model
from test_engine import save_plain_forward
from test_serve_robust import one_line_error, run_cli

from tablefree.serve import ENGINES

POISON = 0x2603  # a prompt holding this id fails every forward pass longer than POISON_AFTER tokens
POISON_AFTER = 5


@pytest.fixture(scope="module")
def faulty_model_dir(tmp_path_factory, code_point_tokenizer):
    """A remote-code model (forward takes token ids alone) whose forward raises for rows holding POISON once they are
    longer than POISON_AFTER tokens: a fault of one sequence in the middle of its decoding."""
    path = save_plain_forward(tmp_path_factory.mktemp("models") / "faulty", code_point_tokenizer)
    modeling = path / "plain_forward_model.py"
    source = modeling.read_text()
    fault = (f"    def forward(self, idx):\n        if idx.shape[1] > {POISON_AFTER} and (idx == {POISON}).any():\n"
             f"            raise RuntimeError('injected forward fault')\n")
    assert "    def forward(self, idx):\n" in source
    modeling.write_text(source.replace("    def forward(self, idx):\n", fault))
    return path


@pytest.mark.parametrize("engine", ENGINES)
def test_a_fault_in_one_request_fails_it_alone(faulty_model_dir, tmp_path, engine):
    server = ServerProcess(faulty_model_dir, tmp_path / "serve.log", "--trust-remote-code", "--served-model-name", "m",
                           "--engine", engine)
    body = lambda ids, stream=False: {"model": "m", "prompt": ids, "max_tokens": 8, "temperature": 0,  # noqa: E731
                                      "ignore_eos": True, "stream": stream}
    poisoned, good = [POISON, 65, 66], [67, 68, 69]  # equal lengths: the uncached path batches them together

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(http.post("/v1/completions", json=body(poisoned)),
                                        http.post("/v1/completions", json=body(poisoned, stream=True)),
                                        http.post("/v1/completions", json=body(good)),
                                        http.post("/v1/completions", json=body(good, stream=True)))

    try:
        alone = httpx.post(f"{server.url}/v1/completions", json=body(good), timeout=120).json()["choices"][0]["text"]
        failed, failed_stream, ok, ok_stream = asyncio.run(together())
        assert failed.status_code == 500 and "injected forward fault" in failed.json()["error"]["message"]
        events = [line[len("data: "):] for line in failed_stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected forward fault" in json.loads(events[-2])["error"]["message"]
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == alone
        streamed = [json.loads(line[len("data: "):]) for line in ok_stream.text.splitlines()
                    if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in streamed) == alone
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log_path.read_text()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_killed_engine_process_fails_its_requests_and_stops_the_server(tmp_path_factory):
    server = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / "killed.log",
                           "--engine", "process")
    engine = server.engine_pid()
    assert engine is not None
    long = {"prompt": "x", "max_tokens": 1000, "ignore_eos": True}
    lines: list[str] = []
    plain: list[httpx.Response] = []
    first = threading.Event()

    def stream():
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True}, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    def body():
        plain.append(httpx.post(f"{server.url}/v1/completions", json=long, timeout=120))

    clients = [threading.Thread(target=stream), threading.Thread(target=body)]
    try:
        for client in clients:
            client.start()
        assert first.wait(120)
        os.kill(engine, signal.SIGKILL)
        health = []
        while server.process.poll() is None and len(health) < 50:
            try:
                health.append(httpx.get(f"{server.url}/health", timeout=5).status_code)
            except httpx.HTTPError:
                break
        for client in clients:
            client.join(120)
        assert server.process.wait(60) == 2
    finally:
        server.stop()
    died = "the engine process died (killed by SIGKILL)"
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == 500 and died in error["message"]
    assert plain[0].status_code == 500 and died in plain[0].json()["error"]["message"]
    # Probes answered before the death was known say 200; once one says 503, every later one does
    assert 200 not in health[health.index(503):] if 503 in health else set(health) <= {200}, health
    log = server.log_path.read_text()
    assert log.strip().splitlines()[-1].startswith(f"error: {died}; the server stopped"), log[-2000:]
    assert "Traceback" not in log


def test_the_engine_process_exits_when_the_server_is_killed(tmp_path_factory):
    server = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / "orphan.log",
                           "--engine", "process")
    engine = server.engine_pid()
    def generate():
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True},
                       timeout=60)

    busy = threading.Thread(target=generate)
    busy.start()
    try:
        time.sleep(1)  # generating
        server.process.kill()
        assert wait_until(lambda: gone(engine), 15), "the engine process outlived its server"
    finally:
        server.stop()
        busy.join(60)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint-to-the-group", "sigterm"])
def test_a_signal_stops_both_processes_cleanly(tmp_path_factory, sig):
    """SIGINT to the process group is a terminal's Ctrl-C: both processes get it, the server alone acts on it."""
    server = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / "signal.log",
                           "--engine", "process", new_session=True)
    engine = server.engine_pid()
    reply: list[httpx.Response] = []
    request = threading.Thread(target=lambda: reply.append(httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 200, "ignore_eos": True}, timeout=120)))
    request.start()
    time.sleep(1)  # in flight: it is drained, not cut
    if sig == signal.SIGINT:
        os.killpg(server.process.pid, sig)
    else:
        server.process.send_signal(sig)
    try:
        code = server.process.wait(90)
    finally:
        server.stop()
    request.join(60)
    # uvicorn re-raises the signal once drained: SIGINT ends as KeyboardInterrupt does ("interrupted", status 130)
    assert code in ((0, -sig) if sig == signal.SIGTERM else (130,)), server.log_path.read_text()[-3000:]
    assert reply[0].status_code == 200 and reply[0].json()["usage"]["completion_tokens"] == 200
    assert wait_until(lambda: gone(engine), 15)
    assert "Traceback" not in server.log_path.read_text()


def test_a_model_that_fails_to_load_is_the_same_one_line_error_with_either_engine(tmp_path, tmp_path_factory):
    model = serving_model(tmp_path_factory)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((model / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    for path in (broken, tmp_path / "missing"):
        lines = {}
        for engine in ENGINES:
            code, out, err = run_cli(["serve", str(path), "--port", "0", "--engine", engine])
            assert code == 2, (engine, err)
            lines[engine] = one_line_error(out, err)
        assert lines["process"] == lines["thread"], lines


def test_a_full_queue_is_503_before_the_engine_process_sees_it(tmp_path_factory):
    """The server's process counts the sequences on their way to the engine process and those waiting in it, so a
    flood is turned away at once with 503 and Retry-After; what it lets through is served whole."""
    server = ServerProcess(serving_model(tmp_path_factory), tmp_path_factory.mktemp("logs") / "queue.log",
                           "--engine", "process", "--max-batch-size", "2", "--max-queue", "4")
    body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "n": 4}

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(12)))

    try:
        responses = asyncio.run(flood())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] and "server busy" in busy.json()["error"]["message"]
        assert all(len(r.json()["choices"]) == 4 for r in responses if r.status_code == 200)
        assert wait_until(lambda: "tablefree_queue_depth 0.0" in httpx.get(f"{server.url}/metrics").text)
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.log_path.read_text()


class Events(list):
    """A sequence's sink: every event it is handed; `started` is set by the first (no polling), `done` by the last."""

    def __init__(self):
        super().__init__()
        self.started, self.done = threading.Event(), threading.Event()

    def __call__(self, event):
        self.append(event)
        self.started.set()
        if event.finish_reason:
            self.done.set()


def test_the_model_loads_in_a_thread_that_has_ended(saved_tiny_model, monkeypatch):
    """load_engine (both engines' path) loads the model in a passing thread, so the engine's own thread holds the
    process's only OpenMP pool (runtime.in_passing_thread says why)."""
    from tablefree.serve import server

    loaders, load = [], server.load_for_serving

    def recorded(*args, **kwargs):
        loaders.append(threading.current_thread())
        return load(*args, **kwargs)

    monkeypatch.setattr(server, "load_for_serving", recorded)
    engine, _, facts = server.load_engine(server.EngineSpec(str(saved_tiny_model[0]), device="cpu", max_model_len=256))
    [loader] = loaders
    assert loader is not threading.current_thread() and not loader.is_alive()
    assert facts.max_model_len == 256 and engine.model is not None


def test_the_process_engine_serves_cancels_and_reports_its_death_without_http(saved_tiny_model):
    """ProcessEngine as the app drives it: greedy ids equal the thread engine's, a cancellation ends a sequence in the
    engine process, and a killed engine process ends the running sequence with an error, refuses new ones and calls
    on_death once."""
    from tablefree.serve.engine import Sequence
    from tablefree.serve.engine_process import EngineDead, ProcessEngine
    from tablefree.serve.params import SamplingParams
    from tablefree.serve.server import EngineSpec, load_engine, load_serving_tokenizer

    # Long sequences (the whole context), cancelled or killed as soon as their first event arrives (Events.started):
    # polling every 0.1 s for it, 60 tokens of this model were sometimes all made before the test acted.
    spec = EngineSpec(str(saved_tiny_model[0]), device="cpu", threads=1, max_model_len=256, seed=0)
    tokenizer = load_serving_tokenizer(spec.model_path, False)
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def sequences(engine, count: int, params=greedy) -> list[Sequence]:
        made = [Sequence(ids, params, tokenizer, Events(), set(), choice=i) for i in range(count)]
        engine.submit(made)
        return made

    thread, _, _ = load_engine(spec)
    thread.start()
    try:
        [alone] = sequences(thread, 1)
        assert alone.sink.done.wait(60)
        expected = [t for e in alone.sink for t in e.token_ids]
    finally:
        thread.stop()
    engine, deaths = ProcessEngine(spec), []
    engine.on_death = lambda: deaths.append(engine.failure)
    try:
        assert engine.ready().max_model_len == 256
        engine.start()
        batch = sequences(engine, 3)
        assert all(s.sink.done.wait(60) for s in batch)
        assert [[t for e in s.sink for t in e.token_ids] for s in batch] == [expected] * 3
        assert all(s.finished and s.sink[-1].finish_reason == "length" for s in batch)
        [cancelled] = sequences(engine, 1, SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True))
        assert cancelled.sink.started.wait(60)
        cancelled.cancel()
        assert cancelled.sink.done.wait(60) and cancelled.sink[-1].finish_reason == "abort"
        assert len(cancelled.sink) < 240
        [running] = sequences(engine, 1, SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True))
        assert running.sink.started.wait(60)
        os.kill(engine._process.pid, signal.SIGKILL)
        assert running.sink.done.wait(60)
        assert running.sink[-1].finish_reason == "error" and "engine process died (killed by SIGKILL)" in running.sink[-1].error
        assert wait_until(lambda: deaths) and deaths == [engine.failure]
        with pytest.raises(EngineDead):
            sequences(engine, 1)
        assert engine.waiting == engine.running == 0
    finally:
        engine.stop()


def test_drafts_are_counted_and_change_no_text_in_either_engine(tmp_path_factory):
    """A greedy completion whose text loops is guessed by drafts in the thread engine and the engine process alike:
    /metrics counts the guessed and the accepted tokens, and the text is that of a server without drafts."""
    model = serving_model(tmp_path_factory)
    body = {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 0, "ignore_eos": True}
    logs = tmp_path_factory.mktemp("logs")
    texts, counts = {}, {}
    for name, flags in (("thread", ()), ("process", ("--engine", "process")), ("no drafts", ("--draft-tokens", "0"))):
        server = ServerProcess(model, logs / f"{name.replace(' ', '-')}.log", *flags)
        try:
            texts[name] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
            lines = httpx.get(f"{server.url}/metrics").text.splitlines()
            counts[name] = [float(line.split()[1]) for metric in ("tablefree_draft_tokens_total",
                            "tablefree_draft_accepted_tokens_total") for line in lines if line.startswith(metric + " ")]
        finally:
            assert server.stop() in (0, -signal.SIGTERM), server.log_path.read_text()
    assert texts["thread"] == texts["process"] == texts["no drafts"] and texts["thread"]
    assert counts["no drafts"] == [0.0, 0.0]
    for name in ("thread", "process"):
        guessed, held = counts[name]
        assert 0 < held <= guessed, (name, counts)
