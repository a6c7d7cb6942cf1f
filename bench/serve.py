"""Serving throughput: `tablefree serve` against vLLM, `transformers serve` and llama.cpp, same network, one run.

The network is the small-affine preset (4 layers, width 256, context 512, V = 65,536). vLLM (its CPU build, in its
own environment: --vllm-python) serves the table-free directory itself; `transformers serve` gets the stock GPT-NeoX
export (`tablefree export --format gpt-neox`: same weights, same logits), since it has no table-free model class;
`python -m llama_cpp.server` (llama-cpp-python) gets the GGUF export in f32 and q8_0 (`--format gguf`), which has
its own precision, so it runs in the float32 part only. Every server gets the model card's completion ("Once upon a
time,", temperature 0.5, N new tokens), streamed and not, from 1, 8 and 32 concurrent clients, in float32 and
bfloat16 (--dtypes).

Every tablefree server runs with `--draft-tokens 0`: the other servers guess no tokens, so ours decodes one token a
step too (bench/engine.py measures drafts, against llama.cpp's own). All servers of one dtype run at once, each
started alone (the others paused) and warmed up. A turn gives one server
one level (mode, clients) while every other server's processes are stopped (SIGSTOP to its process group and
tree, SIGCONT after): vLLM runs an API server and an engine core in separate processes. In each level every
server takes one turn per repeat, in an order reversed from one repeat to the next, so machine load that drifts
(a shared machine) falls on both sides of every comparison. Per server and level:
- tokens/s: generated tokens (`usage.completion_tokens`; llama_cpp.server sends no usage in a stream, so its
  chunks with text are counted, one per token) over the turn's wall time, median over repeats;
- ours/this: tablefree serve's tokens/s over this server's in the same repeat, median over repeats;
- TTFT: request start to the first chunk with text (streamed only), median over all requests of all repeats;
- tokens per CPU-second: tokens over the user+system CPU time of all the server's processes during the turn, and
  cores: that CPU time over the turn's wall time, busiest: the busiest process's CPU time over the wall time
  (near 1: one core bounds that process; medians).
Per server: resident memory summed over its processes after warm-up and at the end, its start-up (process start
to /health answering 200, and to its first completion answered), and its stream check: at warm-up a greedy
completion biased towards U+2028 (LINE SEPARATOR, which vLLM sends raw inside its JSON) must read the same
streamed as not. The stream reader splits events on b"\\n" only; a text reader that splits lines on U+2028 too
cuts such an event in two.
Last line: ratio = tablefree serve's c8 tokens/s / vLLM's c8 tokens/s (float32, streamed; median of the paired
turns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

PROMPT = "Once upon a time,"
SERVERS = {"tablefree": "tablefree serve", "tablefree-thread": "tablefree thread", "tablefree-process": "tablefree process",
           "tablefree-int8": "tablefree int8",
           "vllm": "vLLM", "transformers": "transformers serve", "llama-f32": "llama.cpp f32", "llama-q8": "llama.cpp q8_0"}
REFERENCES = ("vllm", "transformers", "llama-f32", "llama-q8")  # measured unless --servers says otherwise
ENGINE_OF = {"tablefree": None, "tablefree-thread": "thread", "tablefree-process": "process",
             "tablefree-int8": None}  # --engine (None: default)
# Further flags of a tablefree server: tablefree-int8 runs int8 head and body weights (`auto` would measure them).
FLAGS_OF = {"tablefree-int8": ["--head-precision", "int8", "--body-precision", "int8"]}
DTYPES = ("float32", "bfloat16")
FIXED_PRECISION = ("llama-f32", "llama-q8")  # their weights carry their own precision: run in the float32 part only
VLLM_KV_CACHE_BYTES = 1 << 28  # vLLM's CPU build otherwise reserves most of the machine's memory for its KV cache
LINE_SEPARATOR = "\u2028"
# `python -m llama_cpp.server`, with the weights kept as the file stores them: q8_0 files crash llama.cpp where it
# repacks them for AMX (tablefree.gguf.llama_cpp_without_repacking).
LLAMA_SERVER = ("import runpy; from tablefree.gguf import llama_cpp_without_repacking; llama_cpp_without_repacking(); "
                "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        # Every server gets the same thread count the same way (transformers serve has no flag for it).
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def wait_ready(proc: subprocess.Popen, command: list[str], port: int, log: Path, ready: str, limit: float = 600):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"{command[0]} did not come up in {limit:.0f} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], port: int, log: Path, threads: int | None, ready: str = "/health") -> subprocess.Popen:
    """A server process, returned once `ready` answers 200 (bench/serve_fairness.py starts its server so)."""
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=server_env(threads))
    wait_ready(proc, command, port, log, ready)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` fields of a server-sent event stream, one per line, lines split on b"\\n" alone.

    httpx's aiter_lines splits text on every Unicode line boundary, U+2028 and U+2029 included, which JSON
    carries raw inside strings (vLLM sends them so); an event's bytes never hold b"\\n" inside a character.
    """
    pending = b""
    async for piece in response.aiter_bytes():
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].removeprefix(b" ").removesuffix(b"\r").decode()
    if pending.startswith(b"data:"):
        yield pending[5:].removeprefix(b" ").removesuffix(b"\r").decode()


def completion_body(model: str, max_tokens: int, stream: bool, **fields) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.5, "stream": stream, **fields}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def streamed(client: httpx.AsyncClient, body: dict, count_chunks: bool) -> tuple[int, float, str]:
    """(generated tokens, seconds to first text, text) of one streamed completion; raises on any failure."""
    started = time.perf_counter()
    first, usage, text_chunks, texts = None, None, 0, []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for data in sse_data(response):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:200])
            text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if text:
                texts.append(text)
                text_chunks += 1
                if first is None:
                    first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    if first is None or (usage is None and not count_chunks):
        raise RuntimeError("the stream ended without text or without usage")
    return (text_chunks if usage is None else usage["completion_tokens"]), first, "".join(texts)


async def plain(client: httpx.AsyncClient, body: dict) -> tuple[int, float, str]:
    """(generated tokens, nan, text) of one non-streamed completion; raises on any failure."""
    response = await client.post("/v1/completions", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]!r}")
    reply = response.json()
    return reply["usage"]["completion_tokens"], float("nan"), reply["choices"][0]["text"]


@dataclass
class Turn:
    tokens: int
    wall: float
    cpu: float
    busiest: float  # CPU seconds of the server's busiest process (near `wall`: that process is the bound)
    failed: int
    ttfts: list[float]
    errors: list[str]
    separators: int  # chunks whose text held U+2028 or U+2029, each parsed as one event


async def level(url: str, body: dict, concurrency: int, requests: int, count_chunks: bool) -> tuple[list, list, float]:
    results, failures = [], []
    todo = list(range(requests))

    async def client_loop(client):
        while todo:
            todo.pop()
            try:
                if body["stream"]:
                    results.append(await streamed(client, body, count_chunks))
                else:
                    results.append(await plain(client, body))
            except Exception as exc:  # a failed request is a result here: counted and shown
                failures.append(f"{type(exc).__name__}: {exc}")

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return results, failures, wall


@dataclass
class Server:
    """One server's processes: started in their own process group, paused and resumed as a whole."""

    key: str
    dtype: str
    command: list[str]
    port: int
    model: str
    log: Path
    env: dict
    ready: str = "/health"
    count_chunks: bool = False
    proc: subprocess.Popen | None = None
    processes: dict = field(default_factory=dict)  # pid -> psutil.Process, kept so CPU times stay per process
    health_s: float = float("nan")
    first_s: float = float("nan")
    rss_warm: int = 0
    rss_end: int = 0
    process_count: int = 0
    stream_check: str = ""

    @property
    def name(self) -> str:
        return SERVERS[self.key]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        wait_ready(self.proc, self.command, self.port, self.log, self.ready)
        self.health_s = time.perf_counter() - started
        _, failures, _ = asyncio.run(level(self.url, completion_body(self.model, 8, False, temperature=0), 1, 1,
                                           self.count_chunks))
        if failures:
            raise SystemExit(f"{self.name}: its first completion failed: {failures[0]} (log: {self.log})")
        self.first_s = time.perf_counter() - started

    def tree(self) -> list[psutil.Process]:
        try:
            root = self.processes.setdefault(self.proc.pid, psutil.Process(self.proc.pid))
            for child in root.children(recursive=True):
                self.processes.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return [p for p in self.processes.values() if p.is_running()]

    def cpu_seconds(self) -> dict[int, float]:
        """User + system CPU seconds of each of the server's processes, by pid."""
        seconds = {}
        for process in self.tree():
            try:
                times = process.cpu_times()
                seconds[process.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return seconds

    def rss(self) -> int:
        total = 0
        for process in self.tree():
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def send(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        for process in self.tree():  # any process that left the group
            try:
                if os.getpgid(process.pid) != self.proc.pid:
                    process.send_signal(sig)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass

    def pause(self) -> None:
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def warm_up(self, bias_ids: list[int]) -> None:
        """First-call allocations and lazy loads, then the stream check: greedy text streamed equals the plain one."""
        for stream in (True, False):
            asyncio.run(level(self.url, completion_body(self.model, 8, stream), 2, 2, self.count_chunks))
        check = completion_body(self.model, 16, False, temperature=0, logit_bias={str(i): 100 for i in bias_ids})

        async def both():
            async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
                return (await streamed(client, {**check, "stream": True, "stream_options": {"include_usage": True}},
                                       self.count_chunks))[2], (await plain(client, check))[2]

        text_streamed, text_plain = asyncio.run(both())
        if text_streamed != text_plain:
            raise SystemExit(f"{self.name}: greedy text streamed {text_streamed!r} differs from the plain "
                             f"{text_plain!r}: the stream reader lost or split events")
        self.stream_check = f"equal, {text_plain.count(LINE_SEPARATOR)} x U+2028"
        self.rss_warm = self.rss()
        self.process_count = len(self.tree())

    def turn(self, stream: bool, clients: int, requests: int, max_tokens: int) -> Turn:
        self.resume()
        try:
            before = self.cpu_seconds()
            body = completion_body(self.model, max_tokens, stream)
            results, failures, wall = asyncio.run(level(self.url, body, clients, requests, self.count_chunks))
            spent = [seconds - before.get(pid, 0.0) for pid, seconds in self.cpu_seconds().items()]
        finally:
            self.pause()
        separators = sum(text.count(LINE_SEPARATOR) + text.count("\u2029") for _, _, text in results)
        return Turn(sum(t for t, _, _ in results), wall, sum(spent), max(spent, default=0.0), len(failures),
                    [f for _, f, _ in results], failures[:3], separators)

    def close(self) -> None:
        """Stops every process of the server, those its root leaves behind too."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.rss_end = self.rss()
        for sig in (signal.SIGCONT, signal.SIGTERM):
            self.send_group(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        time.sleep(1)
        self.send_group(signal.SIGKILL)

    def send_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def build_servers(keys: list[str], dtype: str, files: dict, args, workdir: Path) -> list[Server]:
    env = server_env(args.threads)
    threads = str(args.threads or os.cpu_count())
    servers = []
    for key in keys:
        port = free_port()
        log = workdir / f"{key}-{dtype}.log"
        if key in ENGINE_OF:
            command = [sys.executable, "-m", "tablefree.cli", "serve", files["model"], "--port", str(port),
                       "--served-model-name", "bench", "--log-level", "warning", "--device", args.device,
                       "--dtype", dtype, "--draft-tokens", "0"]
            command += (["--engine", ENGINE_OF[key]] if ENGINE_OF[key] else []) + FLAGS_OF.get(key, [])
            servers.append(Server(key, dtype, command, port, "bench", log, env))
        elif key == "vllm":
            command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", files["model"],
                       "--trust-remote-code", "--served-model-name", "bench", "--host", "127.0.0.1", "--port",
                       str(port), "--dtype", dtype, "--max-model-len", str(files["context"]),
                       "--kv-cache-memory-bytes", str(VLLM_KV_CACHE_BYTES), "--seed", "0"]
            vllm_env = dict(env)
            if args.threads:  # its CPU build binds its OpenMP threads to cores itself
                vllm_env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
            servers.append(Server(key, dtype, command, port, "bench", log, vllm_env))
        elif key == "transformers":
            transformers_cli = Path(sys.executable).parent / "transformers"
            command = [str(transformers_cli), "serve", files["neox"], "--port", str(port), "--host", "127.0.0.1",
                       "--device", args.device, "--dtype", dtype]
            servers.append(Server(key, dtype, command, port, files["neox"], log, env))
        else:
            gguf = files[key]
            # one request at a time (it has no batching of its own), never interrupted
            command = [sys.executable, "-c", LLAMA_SERVER, "--model", gguf, "--model_alias", "bench",
                       "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048", "--n_threads", threads,
                       "--n_threads_batch", threads, "--logits_all", "False", "--interrupt_requests", "False",
                       "--n_gpu_layers", "-1" if args.device.startswith("cuda") else "0"]
            servers.append(Server(key, dtype, command, port, "bench", log, env, ready="/v1/models", count_chunks=True))
    return servers


def prepare_files(keys: set[str], args, workdir: Path) -> dict:
    cli = [sys.executable, "-m", "tablefree.cli"]
    model = args.model
    if model is None:
        model = str(workdir / "small-affine")
        subprocess.run(cli + ["new", "small-affine", model], check=True, capture_output=True)
    config = json.loads((Path(model) / "config.json").read_text())
    files = {"model": model, "context": config["max_position_embeddings"]}
    if "transformers" in keys:
        files["neox"] = str(workdir / "gpt-neox")
        subprocess.run(cli + ["export", model, files["neox"], "--format", "gpt-neox"], check=True, capture_output=True)
    for key, outtype in (("llama-f32", "f32"), ("llama-q8", "q8_0")):
        if key in keys:
            out = workdir / f"gguf-{outtype}"
            subprocess.run(cli + ["export", model, str(out), "--format", "gguf", "--outtype", outtype], check=True,
                           capture_output=True)
            files[key] = str(out / "model.gguf")
    from tokenizers import Tokenizer

    files["bias_ids"] = Tokenizer.from_file(str(Path(model) / "tokenizer.json")).encode(
        LINE_SEPARATOR, add_special_tokens=False).ids
    return files


def run_dtype(servers: list[Server], args, turns: dict, bias_ids: list[int]) -> None:
    """Starts each server alone, then gives every level's turns in alternating order; stops them all at the end."""
    try:
        for server in servers:
            print(f"  starting {server.name} ({server.dtype})", file=sys.stderr, flush=True)
            server.launch()
            server.warm_up(bias_ids)
            server.pause()
            print(f"    /health {server.health_s:.1f} s, first completion {server.first_s:.1f} s, "
                  f"{server.rss_warm / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        for stream in (True, False):
            for clients in args.concurrency:
                requests = max(args.min_requests, args.requests_per_client * clients)
                for repeat in range(args.repeats):
                    for server in servers if repeat % 2 == 0 else servers[::-1]:
                        turn = server.turn(stream, clients, requests, args.max_tokens)
                        turns[server.dtype, stream, clients, server.key, repeat] = turn
                        print(f"  {server.dtype} {'stream' if stream else 'plain'} c{clients} r{repeat} "
                              f"{server.name}: {turn.tokens / turn.wall:.0f} tokens/s, {turn.failed} failed",
                              file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.close()


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def report(all_servers: list[Server], turns: dict, args, skipped: list[str]) -> None:
    network = Path(args.model).name if args.model else "small-affine"
    print(f"\n{network} completions of {args.max_tokens} new tokens, temperature 0.5, prompt {PROMPT!r}; "
          f"{args.repeats} repeats of paired turns, order alternated, idle servers paused; "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}, device {args.device}")
    for line in skipped:
        print(line)
    print(f"{'dtype':<9}{'mode':<7}{'clients':>7}  {'server':<19}{'tokens/s':>9}{'ours/this':>10}{'TTFT ms':>9}"
          f"{'tok/CPU-s':>10}{'cores':>6}{'busiest':>8}{'failed':>7}{'U+2028/9':>9}")
    for dtype in args.dtypes:
        for stream in (True, False):
            for clients in args.concurrency:
                for server in [s for s in all_servers if s.dtype == dtype]:
                    paired = [(turns.get((dtype, stream, clients, "tablefree", r)),
                               turns.get((dtype, stream, clients, server.key, r))) for r in range(args.repeats)]
                    mine = [t for _, t in paired if t is not None]
                    if not mine:
                        continue
                    ratios = [o.tokens / o.wall / (t.tokens / t.wall) for o, t in paired if o and t and t.tokens]
                    ttft = median([f for t in mine for f in t.ttfts]) * 1000
                    print(f"{dtype:<9}{'stream' if stream else 'plain':<7}{clients:>7}  {server.name:<19}"
                          f"{median([t.tokens / t.wall for t in mine]):>9.1f}{median(ratios):>10.2f}"
                          f"{ttft:>9.0f}{median([t.tokens / t.cpu if t.cpu else float('nan') for t in mine]):>10.1f}"
                          f"{median([t.cpu / t.wall for t in mine]):>6.2f}{median([t.busiest / t.wall for t in mine]):>8.2f}"
                          f"{sum(t.failed for t in mine):>7}"
                          f"{sum(t.separators for t in mine):>9}")
                    for error in sorted({e for t in mine for e in t.errors})[:3]:
                        print(f"    error: {error}")
    print(f"\n{'dtype':<9}{'server':<19}{'processes':>10}{'RSS GiB warm':>13}{'RSS GiB end':>12}{'/health s':>10}"
          f"{'first s':>9}  stream check (greedy, biased to U+2028)")
    for server in all_servers:
        print(f"{server.dtype:<9}{server.name:<19}{server.process_count:>10}{server.rss_warm / 2**30:>13.2f}"
              f"{server.rss_end / 2**30:>12.2f}{server.health_s:>10.1f}{server.first_s:>9.1f}  {server.stream_check}")
    by = {(s.dtype, s.key): s for s in all_servers}
    for dtype in args.dtypes:
        ours, vllm = by.get((dtype, "tablefree")), by.get((dtype, "vllm"))
        if ours and vllm:
            print(f"{dtype}: tablefree serve / vLLM: memory (RSS warm) {ours.rss_warm / vllm.rss_warm:.2f} "
                  f"(goal <= 0.33), start-up to first completion {ours.first_s / vllm.first_s:.2f} (goal <= 0.2)")
    print("goals for ours/this: >= 1.5 against vLLM at 8 and 32 clients and >= 1.0 at 1 client; "
          ">= 1.0 against llama.cpp q8_0 at 1 client; no failed request")
    headline = [turns.get(("float32", True, 8, key, r)) for r in range(args.repeats) for key in ("tablefree", "vllm")]
    if None in headline:
        print("c8 tokens/s, float32, streamed, tablefree serve / vLLM: not measured (needs both servers, float32, "
              "8 clients)")
        print("ratio nan")
        return
    pairs = [(headline[i], headline[i + 1]) for i in range(0, len(headline), 2)]
    ratio = median([o.tokens / o.wall / (v.tokens / v.wall) for o, v in pairs if v.tokens])
    print("c8 tokens/s, float32, streamed, tablefree serve / vLLM (median of paired turns):")
    print(f"ratio {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a tablefree model directory (default: a fresh small-affine)")
    parser.add_argument("--servers", default=",".join(REFERENCES),
                        help=f"comma-separated servers to measure, tablefree (its default --engine) always among them "
                             f"({', '.join(SERVERS)}; tablefree-thread and tablefree-process name an --engine)")
    parser.add_argument("--dtypes", "--dtype", default=",".join(DTYPES),
                        help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--bfloat16-servers", default=None,
                        help="the servers of the bfloat16 part, when fewer than --servers (llama.cpp is never in it)")
    parser.add_argument("--vllm-python", default=os.environ.get("TABLEFREE_VLLM_PYTHON"),
                        help="the python of vLLM's own environment (default: $TABLEFREE_VLLM_PYTHON); "
                             "without it vLLM is skipped")
    parser.add_argument("--repeats", type=int, default=3, help="turns per server and level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every server (default: each server's own; on a busy shared machine 1 "
                             "avoids OpenMP spin contention)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for tablefree, transformers and llama.cpp")
    args = parser.parse_args()

    def keys_of(text: str) -> list[str]:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        unknown = [k for k in keys if k not in SERVERS]
        if unknown:
            raise SystemExit(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
        return ["tablefree"] + [k for k in SERVERS if k in keys and k != "tablefree"]

    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        raise SystemExit(f"--dtypes {','.join(args.dtypes)!r}: choose from {', '.join(DTYPES)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    keys = {"float32": keys_of(args.servers)}
    keys["bfloat16"] = [k for k in keys_of(args.bfloat16_servers or args.servers) if k not in FIXED_PRECISION]
    skipped = []
    if any("vllm" in ks for ks in keys.values()) and not args.vllm_python:
        skipped.append("vLLM skipped: give the python of its environment with --vllm-python or $TABLEFREE_VLLM_PYTHON")
        keys = {d: [k for k in ks if k != "vllm"] for d, ks in keys.items()}
        print(skipped[-1], file=sys.stderr)
    transformers_cli = Path(sys.executable).parent / "transformers"
    if any("transformers" in ks for ks in keys.values()) and not transformers_cli.is_file():
        raise SystemExit(f"no `transformers` command next to {sys.executable}; install transformers[serving] and "
                         "accelerate, or leave transformers out of --servers")

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    print(f"logs and exports in {workdir}", file=sys.stderr)
    files = prepare_files({k for d in args.dtypes for k in keys[d]}, args, workdir)
    turns: dict = {}
    all_servers: list[Server] = []
    for dtype in args.dtypes:
        servers = build_servers(keys[dtype], dtype, files, args, workdir)
        all_servers += servers
        run_dtype(servers, args, turns, files["bias_ids"])
    report(all_servers, turns, args, skipped)


if __name__ == "__main__":
    main()
