"""Runs at once: `tablefree compare --jobs N` against one run at a time, on the same runs.

A comparison of small models on a few CPU cores is many runs whose matrices are too small to keep every
core busy, so N one-process-per-run jobs may train more tokens per second than one run on all cores.
This times the whole command (process start, training, validation, held-out scoring) for --jobs 1 and
--jobs N over the same variants x seeds, checks that both gave the same models, and prints the ratio.

    python bench/compare_jobs.py [--jobs 2] [--steps 150] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train import prepare_data  # noqa: E402  (bench/train.py: the interpreter's help topics as a corpus)


def run_compare(config: Path, out: Path, jobs: int) -> float:
    began = time.perf_counter()
    command = [sys.executable, "-m", "tablefree.cli", "compare", "--config", str(config), "--out", str(out),
               "--jobs", str(jobs)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"--jobs {jobs} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--variants", default="affine,learned")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = prepare_data(root)
        config = root / "compare.yaml"
        settings = {"data": str(data_dir), "size": "tiny", "seq_len": args.seq_len, "batch_size": args.batch,
                    "max_steps": args.steps, "lr": 5e-3, "warmup_steps": 10, "eval_tokens": 8192,
                    "checkpoint_every": 0, "variants": args.variants, "seeds": args.seeds}
        config.write_text(json.dumps(settings))  # JSON is YAML
        runs = len(args.variants.split(",")) * len(args.seeds.split(","))
        tokens = runs * args.steps * args.batch * args.seq_len
        seconds, losses, trainer = {}, {}, {}
        for jobs in (1, args.jobs):
            out = root / f"jobs{jobs}"
            seconds[jobs] = run_compare(config, out, jobs)
            results = json.loads((out / "results.json").read_text())
            losses[jobs] = [run["val_loss"] for run in results["runs"]]
            trainer[jobs] = sum(run["tokens_per_s"] for run in results["runs"]) / len(results["runs"])
    drift = max(abs(a - b) / b for a, b in zip(losses[args.jobs], losses[1]))
    print(f"{runs} runs of tiny ({args.variants} x seeds {args.seeds}), {args.steps} steps of {args.batch} x "
          f"{args.seq_len} = {tokens:,} tokens in all; {os.cpu_count()} CPUs\n")
    print(f"| {'jobs':>4} | {'wall s':>7} | {'tokens/s, whole command':>23} | {'tokens/s of one run, training only':>34} |")
    print(f"|{'-' * 6}|{'-' * 9}|{'-' * 25}|{'-' * 36}|")
    for jobs, wall in seconds.items():
        print(f"| {jobs:>4} | {wall:>7.1f} | {tokens / wall:>23,.0f} | {trainer[jobs]:>34,.0f} |")
    print(f"\nlargest relative val-loss difference between the two: {drift:.1e} (thread counts round differently)")
    print(f"--jobs {args.jobs} / --jobs 1 tokens/s: {seconds[1] / seconds[args.jobs]:.2f}x")


if __name__ == "__main__":
    main()
