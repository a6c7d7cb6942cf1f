"""Forward+backward cost of the code lift against the nn.Embedding lookup it replaces.

8 x 1024 tokens at width 1024, V = 65,536, fp32, on the device tablefree's runtime picks (--device).
The step includes what training pays for the input: the lookup, and for the table its backward
(a scatter-add into a V x d gradient). The lift has no parameter, so it has no backward.
Last line: the ratio lift / embedding (goal <= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tablefree.codes import CodeLift, build_code
from tablefree.runtime import DEVICE_HELP, resolve_runtime


def time_step(step, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        torch.accelerator.synchronize() if device.type != "cpu" else None
        start = time.perf_counter()
        step()
        torch.accelerator.synchronize() if device.type != "cpu" else None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    args = parser.parse_args()
    device = resolve_runtime(args.device, "float32").device
    vocab = 65_536
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    upstream = torch.randn(args.batch, args.seq, args.width, device=device)  # the gradient arriving from layer 1

    table = torch.nn.Embedding(vocab, args.width).to(device)

    def embedding_step():
        table.weight.grad = None
        table(ids).backward(upstream)

    rows = [("nn.Embedding (learned table)", time_step(embedding_step, args.repeats, device))]
    with torch.no_grad():  # inference pays only the lookup; shown for reference, not the headline
        rows.append(("nn.Embedding forward only", time_step(lambda: table(ids), args.repeats, device)))
    for family in ("minimal", "affine", "hashed"):
        for layout in ("tile", "interleave"):
            lift = CodeLift(build_code(family, vocab, seed=0), args.width, layout=layout)
            rows.append((f"CodeLift {family}/{layout}", time_step(lambda: lift(ids), args.repeats, device)))

    reference = rows[0][1]
    print(f"input interface cost, {args.batch} x {args.seq} tokens, width {args.width}, V {vocab:,}, fp32 on {device}")
    print(f"{'interface':32s} {'ms/step':>9s} {'ratio':>7s}")
    for name, seconds in rows:
        print(f"{name:32s} {seconds * 1e3:9.2f} {seconds / reference:7.3f}")
    headline = dict(rows)["CodeLift affine/tile"] / reference
    print(f"ratio {headline:.3f}")


if __name__ == "__main__":
    main()
