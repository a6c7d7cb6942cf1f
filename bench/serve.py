"""Serving throughput: `tablefree serve` against `transformers serve` and llama.cpp's server, same network, one run.

Every server gets the same streamed requests (the model card's completion: "Once upon a time,",
temperature 0.5, N new tokens) from 1, 8 and 32 concurrent clients. Aggregate generated tokens/s
counts the `usage.completion_tokens` each server reports (llama_cpp.server sends no usage in a
stream: its chunks with text are counted, one per token); time to first token is request start to
the first chunk with text. The network is the small-affine preset (4 layers, width 256,
V = 65,536); `transformers serve` gets its stock GPT-NeoX export (`tablefree export --format
gpt-neox`: same weights, same logits), since it has no table-free model class, and
`python -m llama_cpp.server` (llama-cpp-python) its GGUF export in f32 and q8_0 (`--format gguf`).
Goals: our c8 >= 3x our c1, and >= 1.5x transformers serve's c8; against llama.cpp f32: our c1 >=
0.5x its c1 and our c8 >= 1.5x its c8; no failed request.
Last line: ratio = our c8 tokens/s / transformers serve's c8 tokens/s.
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
from pathlib import Path

import httpx

from tablefree.runtime import add_runtime_flags, resolve_runtime

PROMPT = "Once upon a time,"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path, threads: int | None, ready: str = "/health") -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        # Both servers get the same thread count the same way (transformers serve has no flag for it).
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{command[0]} did not come up:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client: httpx.AsyncClient, model: str, max_tokens: int, count_chunks: bool) -> tuple[int, float]:
    """(generated tokens, seconds to first text) for one streamed completion; raises on any failure."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.5, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, usage, text_chunks = None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:200])
            if any(c.get("text") for c in chunk.get("choices", [])):
                text_chunks += 1
                if first is None:
                    first = time.perf_counter() - started
            usage = chunk.get("usage") or usage
    if first is None or (usage is None and not count_chunks):
        raise RuntimeError("the stream ended without text or without usage")
    return (text_chunks if usage is None else usage["completion_tokens"]), first


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, count_chunks: bool = False) -> dict:
    results, failures = [], []
    todo = list(range(requests))

    async def client_loop(client):
        while todo:
            todo.pop()
            try:
                results.append(await one_request(client, model, max_tokens, count_chunks))
            except Exception as exc:  # a failed request is a result here: counted and shown
                failures.append(str(exc))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    return {"concurrency": concurrency, "requests": requests, "failed": len(failures), "tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_ms": 1000 * statistics.median([f for _, f in results]) if results else float("nan"),
            "errors": failures[:3]}


def measure(name: str, command: list[str], port: int, model: str, args, workdir: Path, ready: str = "/health",
            count_chunks: bool = False) -> list[dict]:
    proc = start(command, port, workdir / f"{name.replace(' ', '_')}.log", args.threads, ready)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(level(url, model, 2, 2, 8, count_chunks))  # warm-up: first-call allocations and lazy loads
        rows = []
        for c in args.concurrency:
            row = level(url, model, c, max(args.min_requests, args.requests_per_client * c), args.max_tokens, count_chunks)
            rows.append({"server": name, **asyncio.run(row)})
            print(f"  {name} c{c}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        return rows
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a tablefree model directory (default: a fresh small-affine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both servers (default: torch's; on a busy shared machine 1 avoids OpenMP spin contention)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave transformers serve out (no ratio line)")
    parser.add_argument("--skip-llama", action="store_true", help="leave llama_cpp.server out")
    add_runtime_flags(parser)
    args = parser.parse_args()
    args.runtime = resolve_runtime(args.device, args.dtype, args.threads)  # the servers cast weights to it, as serve does

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cli = [sys.executable, "-m", "tablefree.cli"]
    model = args.model
    if model is None:
        model = str(workdir / "small-affine")
        subprocess.run(cli + ["new", "small-affine", model], check=True, capture_output=True)
    neox = str(workdir / "gpt-neox")
    subprocess.run(cli + ["export", model, neox, "--format", "gpt-neox"], check=True, capture_output=True)

    ours_port, theirs_port = free_port(), free_port()
    rows = measure("tablefree serve", cli + ["serve", model, "--port", str(ours_port), "--served-model-name", "bench",
                                             "--log-level", "warning", "--device", str(args.runtime.device),
                                             "--dtype", str(args.runtime.dtype).removeprefix("torch.")],
                   ours_port, "bench", args, workdir)
    if not args.skip_transformers:
        rows += measure_transformers(neox, theirs_port, args, workdir)
    if not args.skip_llama:
        for outtype in ("f32", "q8_0"):
            rows += measure_llama(cli, model, outtype, args, workdir)
    report(rows, args)


def measure_llama(cli: list[str], model: str, outtype: str, args, workdir: Path) -> list[dict]:
    """llama_cpp.server on the GGUF export; one request at a time (it has no batching of its own), never interrupted."""
    out = workdir / f"gguf-{outtype}"
    subprocess.run(cli + ["export", model, str(out), "--format", "gguf", "--outtype", outtype], check=True, capture_output=True)
    port = free_port()
    threads = str(args.threads or os.cpu_count())
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(out / "model.gguf"), "--model_alias", "bench",
               "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048", "--n_threads", threads,
               "--n_threads_batch", threads, "--logits_all", "False", "--interrupt_requests", "False",
               "--n_gpu_layers", "-1" if args.runtime.device.type == "cuda" else "0"]
    return measure(f"llama.cpp {outtype}", command, port, "bench", args, workdir, ready="/v1/models", count_chunks=True)


def measure_transformers(neox: str, port: int, args, workdir: Path) -> list[dict]:
    transformers_cli = Path(sys.executable).parent / "transformers"
    if not transformers_cli.is_file():
        raise SystemExit(f"no `transformers` command next to {sys.executable}; install transformers[serving] and accelerate")
    command = [str(transformers_cli), "serve", neox, "--port", str(port), "--host", "127.0.0.1",
               "--device", str(args.runtime.device)]
    return measure("transformers serve", command, port, neox, args, workdir)


def report(rows: list[dict], args) -> None:
    print(f"\nstreamed completions, {args.max_tokens} new tokens each, temperature 0.5, prompt {PROMPT!r}; "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}, {args.runtime.describe()}")
    print(f"{'server':<20}{'clients':>8}{'requests':>10}{'failed':>8}{'tokens':>8}{'tokens/s':>10}{'median TTFT ms':>16}")
    for r in rows:
        print(f"{r['server']:<20}{r['concurrency']:>8}{r['requests']:>10}{r['failed']:>8}{r['tokens']:>8}"
              f"{r['tokens_per_s']:>10.1f}{r['ttft_ms']:>16.0f}")
        for error in r["errors"]:
            print(f"    error: {error}")
    by = {(r["server"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    failed = sum(r["failed"] for r in rows if r["server"] == "tablefree serve")
    if ("tablefree serve", 8) in by and ("tablefree serve", 1) in by:
        print(f"tablefree serve c8 / c1: {by['tablefree serve', 8] / by['tablefree serve', 1]:.2f} (goal >= 3)")
    print(f"failed tablefree requests: {failed} (goal 0)")
    for outtype in ("f32", "q8_0"):
        if (f"llama.cpp {outtype}", 1) in by and ("tablefree serve", 1) in by:
            ones = by["tablefree serve", 1] / by[f"llama.cpp {outtype}", 1]
            eights = by.get(("tablefree serve", 8), float("nan")) / by.get((f"llama.cpp {outtype}", 8), float("nan"))
            goal = " (goals >= 0.5 and >= 1.5)" if outtype == "f32" else ""
            print(f"tablefree serve / llama.cpp {outtype}: c1 {ones:.2f}, c8 {eights:.2f}{goal}")
    if ("transformers serve", 8) in by:
        ratio = by["tablefree serve", 8] / by["transformers serve", 8]
        print("c8 tokens/s, tablefree serve / transformers serve (goal >= 1.5):")
        print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
