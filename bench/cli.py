"""Latency of `tablefree --help` and `tablefree VERB --help` against starting Python itself.

Each command runs as a fresh `python -m tablefree.cli ...` process, as a user's shell runs it; the
reference is `python -c pass`, measured in the same run. Median of --repeats runs each. Last line:
the slowest help as a ratio to the reference (the goal is an answer in under 1 s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from tablefree.cli import VERBS


def seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    reference = seconds(["-c", "pass"], args.repeats)
    print(f"{'command':32s} {'seconds':>8s} {'x python -c pass':>17s}")
    print(f"{'python -c pass':32s} {reference:8.3f} {1.0:17.1f}")
    slowest = ("", 0.0)
    for words in ([], *([verb] for verb in VERBS)):
        took = seconds(["-m", "tablefree.cli", *words, "--help"], args.repeats)
        name = " ".join(["tablefree", *words, "--help"])
        print(f"{name:32s} {took:8.3f} {took / reference:17.1f}")
        slowest = max(slowest, (name, took), key=lambda item: item[1])
    print(f"slowest help: {slowest[0]}, {slowest[1]:.3f} s = {slowest[1] / reference:.1f} x python -c pass")


if __name__ == "__main__":
    main()
