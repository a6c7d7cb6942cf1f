"""What a small operator call costs right after the decode step's big read, against the same call warm.

A one-row decode step streams the int8 output head (16 MiB for V = 65,536 and width 256) through the caches, then
runs the next step's body as a hundred small operator calls. This measures, per round: the big read (oneDNN's int8
head product where it runs exactly, as the engine's int8 head; and a plain float32 sum over 16 MiB), then the first
calls of a few small operators right after it, then the same calls again (warm). Means over --rounds rounds, at 1 and
at 2 threads: if the first calls cost more at 1 thread too, the cost is the caches, not OpenMP's worker threads.
Then a whole one-row body of int8 weights (SlotDecoder's step without the head; a fresh small-affine from `tablefree
new` unless --model is given), medians of --rounds: run back to back, right after the int8 head's product, and right
after the plain 16 MiB read, 2 threads.
No goal; docs/architecture.md ("What stands in the way on one stream") quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tablefree.serve.decoder import SlotDecoder
from tablefree.serve.precision import Int8Head, integer_product, onednn_int8_exact
from tablefree.serve.server import load_for_serving

V, WIDTH = 65_536, 256


def small_calls(logits: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The small operators, in the order they run after the big read (a step's logits, then its sampler's first ops)."""
    scale = torch.full((1, 1), 0.5)  # out of place: repeated in place, the values would drift into subnormals
    return {
        f"mul over {V:,} floats": lambda: logits.mul(scale),
        "amax of 256 blocks": lambda: logits.view(1, -1, 256).amax(-1),
        "max over 256 floats": lambda: logits[0, :256].max(-1),
        "layer_norm of 1 x 256": lambda: torch.nn.functional.layer_norm(logits[:, :WIDTH], (WIDTH,)),
    }


def rounds(big_read: Callable[[], object], logits: torch.Tensor, count: int) -> dict[str, tuple[float, float]]:
    """Per small call: (mean us right after `big_read`, mean us at its second call)."""
    calls = small_calls(logits)
    cold = {name: 0.0 for name in calls}
    warm = {name: 0.0 for name in calls}
    for round_ in range(count + 20):  # the first 20 rounds warm the code up and are not counted
        big_read()
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            first = time.perf_counter() - began
            began = time.perf_counter()
            call()
            second = time.perf_counter() - began
            if round_ >= 20:
                cold[name] += first
                warm[name] += second
    return {name: (1e6 * cold[name] / count, 1e6 * warm[name] / count) for name in calls}


def one_row_body(path: str) -> tuple[Callable[[], torch.Tensor], Int8Head]:
    """A decode step's body for one row of the model at `path` (int8 weights, after a 16-token prompt), and its int8
    head."""
    model, _ = load_for_serving(path, torch.float32, torch.device("cpu"), trust_remote_code=False)
    decoder = SlotDecoder(model, 1, 64, lower_body=True)
    prompt = torch.arange(100, 116)[None]
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        decoder.add([(layer.keys, layer.values) for layer in cache.layers], [prompt.shape[1]])
    token, position = torch.tensor([7]), torch.tensor([prompt.shape[1]])  # rewritten in place each call

    def body() -> torch.Tensor:
        with torch.inference_mode():
            return decoder.step(token, position)

    return body, Int8Head.of(model)


def body_times(body: Callable[[], torch.Tensor], before: Callable[[torch.Tensor], object] | None, count: int) -> float:
    """Median ms of the body right after `before` (given the body's output), or right after itself."""
    times = []
    for round_ in range(count + 20):
        hidden = body()
        if before is not None:
            before(hidden)
        began = time.perf_counter()
        body()
        if round_ >= 20:
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--model", help="a model directory for the body's part (default: a fresh small-affine)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (V, WIDTH), dtype=torch.int8, generator=generator)
    codes = torch.randint(0, 256, (1, WIDTH), dtype=torch.uint8, generator=generator)
    scales, zero_points = torch.rand(V, generator=generator) / 127, torch.zeros(V, dtype=torch.long)
    floats = torch.randn(V * WIDTH // 4, generator=generator)  # 16 MiB of float32
    logits = torch.randn(1, V, generator=generator)
    reads = {"a 16 MiB float32 sum": lambda: floats.sum()}
    if onednn_int8_exact():
        packed = torch.ops.onednn.qlinear_prepack(weight, [1, WIDTH])
        reads = {"oneDNN's int8 head product": lambda: integer_product(codes, packed, scales, zero_points), **reads}
    else:
        print("oneDNN's int8 product does not run exactly here: only the float32 read is measured")
    ratios = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for what, read in reads.items():
            print(f"\nafter {what}, {threads} thread{'s' if threads > 1 else ''} (means of {args.rounds} rounds):")
            for name, (cold, warm) in rounds(read, logits, args.rounds).items():
                print(f"  {name:<28} {cold:7.1f} us right after, {warm:6.1f} us at its second call ({cold / warm:.1f}x)")
                ratios.append(cold / warm)
    path = args.model
    if path is None:
        path = str(Path(tempfile.mkdtemp(prefix="bench-cold-")) / "small-affine")
        subprocess.run([sys.executable, "-m", "tablefree.cli", "new", "small-affine", path], check=True,
                       capture_output=True)
    body, head = one_row_body(path)
    torch.set_num_threads(2)
    print(f"\na one-row int8 body of {Path(path).name}, 2 threads, medians of {args.rounds} rounds (the head: "
          f"{head.kind}):")
    alone = body_times(body, None, args.rounds)
    print(f"  {'back to back':<42} {alone:6.3f} ms")
    for what, before in (("right after the int8 head's product", head), ("right after a 16 MiB float32 sum",
                                                                          lambda _: floats.sum())):
        after = body_times(body, before, args.rounds)
        print(f"  {what:<42} {after:6.3f} ms ({after / alone:.2f}x)")
    print("\nfirst call right after the read / second call, median over every call above:")
    print(f"ratio {sorted(ratios)[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
