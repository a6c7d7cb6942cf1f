"""Fairness of the shared decode step: what one request's fields cost every other client, on one `tablefree serve`.

The other client streams 8 greedy tokens (prompt "Once upon a time,", end-of-sequence ignored); its latency, request
sent to `[DONE]`, is measured alone and beside the heaviest legal request of each sampling field, in one run. Each
heavy request asks for n=4 choices of 256 new tokens (its field at the most the server accepts: a logit_bias of every
id, 16 stop strings filling the body limit, penalties over a 700-token prompt, top-k of V-1, ...); it is streamed,
the other client is measured once its first token has arrived, then it is closed, which ends it. The `n` row sends
4 prompts x n=16 (64 sequences, the most a request may have); the echo row (a body of tens of MB), not streamed: 4
prompts of 1,024 ids, n=16, echo, logprobs 20, max_tokens 0, with /health polled while it runs. `plain` is a heavy
request of the same shape with no field set: what sharing the batch costs anyway.
The network is the tiny-affine preset (2 layers, width 64, V = 65,536, context 1,024), on which a row's sampling
weighs most against its forward pass. Figures are the median of --repeats.
Last line: ratio = the worst field's latency beside it / the latency alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start, stop  # noqa: E402  (bench/serve.py: the same server start and stop)

PROMPT = "Once upon a time,"
CONTEXT = 1024
LONG = [0x4E00 + (i * 7919) % 20000 for i in range(700)]  # CJK code points: one token each, none special
SCORED = [[0x4E00 + (p * 1000 + i * 31) % 20000 for i in range(CONTEXT)] for p in range(4)]
BODY_LIMIT = 4 * 1024 * 1024


def stops(total: int) -> list[str]:
    """16 distinct stop strings the model never writes, `total` characters in all."""
    return [f"{j:02d}" + "\x7f" * (total // 16 - 2) for j in range(16)]


EVERY_ID = {str(i): 0.5 for i in range(65536)}
HEAVY = {  # field: (what the request sets, besides n=4 and 256 new tokens)
    "plain": {},
    "logit_bias": {"logit_bias": EVERY_ID},
    "stop": {"stop": stops(BODY_LIMIT - 100_000)},
    "presence+frequency": {"prompt": LONG, "presence_penalty": 2.0, "frequency_penalty": 2.0},
    "repetition_penalty": {"prompt": LONG, "repetition_penalty": 10.0},
    "top_k": {"top_k": 65535},
    "top_p": {"top_p": 0.999},
    "min_p": {"min_p": 1e-9},
    "seed": {"seed": 1},
    "logprobs": {"logprobs": 20},
    "n, best_of": {"prompt": [LONG[:8], LONG[8:16], LONG[16:24], LONG[24:32]], "n": 16, "best_of": 16},
    "all of them": {"prompt": LONG, "logit_bias": EVERY_ID, "stop": stops(BODY_LIMIT - 1_300_000),
                    "presence_penalty": 2.0, "frequency_penalty": 2.0, "repetition_penalty": 10.0, "top_k": 65535,
                    "top_p": 0.999, "min_p": 1e-9, "seed": 1, "logprobs": 20},
}
ECHO = {"prompt": SCORED, "n": 16, "best_of": 16, "echo": True, "logprobs": 20, "max_tokens": 0}


async def other_client(client: httpx.AsyncClient) -> float:
    """Seconds for the other client's 8 streamed greedy tokens."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"the other client got {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return time.perf_counter() - started
    raise SystemExit("the other client's stream ended without [DONE]")


async def idle(client: httpx.AsyncClient) -> None:
    """Waits until the server runs and queues nothing (a closed heavy request is cancelled at the next step)."""
    while True:
        text = (await client.get("/metrics")).text
        busy = [line for line in text.splitlines() if line.startswith(("tablefree_running_sequences ",
                                                                       "tablefree_queue_depth "))]
        if all(float(line.split()[-1]) == 0 for line in busy):
            return
        await asyncio.sleep(0.05)


async def beside(client: httpx.AsyncClient, fields: dict, repeats: int) -> float:
    body = {"prompt": PROMPT, "n": 4, "max_tokens": 256, "temperature": 1.0, "ignore_eos": True, "stream": True, **fields}
    body["max_tokens"] = min(body["max_tokens"], CONTEXT - (len(body["prompt"]) if isinstance(body["prompt"][0], int)
                                                             else 32))
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"the heavy request got {response.status_code}: {(await response.aread())[:300]!r}")
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data: {") and any(c["text"] for c in json.loads(line[6:])["choices"]):
                break  # it is running
        latencies = [await other_client(client) for _ in range(repeats)]
    await idle(client)
    return statistics.median(latencies)


async def beside_echo(client: httpx.AsyncClient) -> tuple[float, float, float]:
    """(other client's latency, slowest /health, seconds of the echo request) with the item-11 request running."""
    heavy = asyncio.create_task(client.post("/v1/completions", json=ECHO, timeout=600))
    health: list[float] = []

    async def poll():
        while not heavy.done():
            started = time.perf_counter()
            await client.get("/health")
            health.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    started = time.perf_counter()
    poller = asyncio.create_task(poll())
    await asyncio.sleep(0.3)
    latency = await other_client(client)
    response = await heavy
    elapsed = time.perf_counter() - started
    await poller
    if response.status_code != 200:
        raise SystemExit(f"the echo request got {response.status_code}: {response.text[:300]}")
    await idle(client)
    return latency, max(health), elapsed


async def measure(url: str, repeats: int, only: list[str]) -> tuple[float, float, dict, tuple]:
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await other_client(client)  # warm-up
        alone = statistics.median([await other_client(client) for _ in range(repeats)])
        health_alone = []
        for _ in range(20):
            started = time.perf_counter()
            await client.get("/health")
            health_alone.append(time.perf_counter() - started)
        fields = {}
        for name, extra in HEAVY.items():
            if only and name not in only:
                continue
            fields[name] = await beside(client, extra, repeats)
            print(f"  {name}: {fields[name]:.3f} s", file=sys.stderr, flush=True)
        echo = await beside_echo(client)
        return alone, max(health_alone), fields, echo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: a fresh tiny-affine)")
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fields", nargs="*", default=[], choices=list(HEAVY), help="only these rows (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "tiny")
            subprocess.run([sys.executable, "-m", "tablefree.cli", "new", "tiny-affine", model,
                            f"max_position_embeddings={CONTEXT}"], check=True, capture_output=True)
        port = free_port()
        server = start([sys.executable, "-m", "tablefree.cli", "serve", model, "--port", str(port), "--threads",
                        str(args.threads), "--log-level", "warning"], port, Path(tmp) / "server.log", None)
        try:
            alone, health_alone, fields, echo = asyncio.run(measure(f"http://127.0.0.1:{port}", args.repeats, args.fields))
        finally:
            stop(server)
    print(f"\nanother client's 8 greedy streamed tokens, alone and beside each heavy request; tiny-affine, "
          f"{os.cpu_count()} CPUs, server threads {args.threads}, median of {args.repeats}")
    print(f"{'beside':<22}{'latency s':>11}{'x alone':>9}")
    print(f"{'(alone)':<22}{alone:>11.3f}{1:>9.1f}")
    for name, latency in fields.items():
        print(f"{name:<22}{latency:>11.3f}{latency / alone:>9.1f}")
    latency, health, elapsed = echo
    print(f"{'echo+logprobs (item 11)':<22}{latency:>11.3f}{latency / alone:>9.1f}")
    print(f"echo request: {elapsed:.1f} s; slowest /health meanwhile {health * 1000:.0f} ms "
          f"(alone {health_alone * 1000:.0f} ms)")
    worst = max([*fields.values(), latency]) / alone
    print(f"ratio {worst:.1f}")


if __name__ == "__main__":
    main()
