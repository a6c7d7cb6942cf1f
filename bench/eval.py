"""`tablefree eval` of the quickstart model on the quickstart's validation data: peak RSS and seconds.

Each way runs in a fresh process, timed from start to exit (wall and CPU seconds: the CPU seconds
stay comparable on a machine that others load), its peak RSS read from the kernel:
- imports:     python importing what `tablefree eval` imports (torch, transformers, the model classes): the floor
- full logits: the model's whole forward, logits of all 16 windows x seq_len x V at once (how eval worked)
- chunked:     `tablefree eval MODEL --data DIR` (backbone once, head and cross-entropy a few positions at a time)
Both score the same windows (the model's context, up to tablefree eval's token limit) and must agree.
The reference is built first with `tablefree quickstart --steps 1` in a temporary directory, unless
--quickstart names an existing quickstart output. Last line: full logits / chunked, RSS and seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tablefree.runtime import DEVICE_HELP

IMPORTS = "import tablefree, tablefree.evaluate, tablefree.hub; tablefree.register_auto_classes()"  # what `tablefree eval` imports


def full_logits_scores(model_dir: str, data_dir: str, device: str) -> None:
    """The reference, in this (child) process: the whole logits of each batch, then cross-entropy."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from tablefree import register_auto_classes
    from tablefree.data import TokenShards
    from tablefree.evaluate import BATCH_WINDOWS, EVAL_TOKENS, same_length_batches, token_byte_lengths
    from tablefree.hub import load_model
    from tablefree.runtime import resolve_runtime

    register_auto_classes()
    model, tokenizer = load_model(model_dir, device=resolve_runtime(device, "float32").device)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    windows = TokenShards(data_dir, "val").sequential(model.config.max_position_embeddings, EVAL_TOKENS)
    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for batch in same_length_batches(windows, BATCH_WINDOWS):
            rows = np.stack(batch)
            ids = torch.as_tensor(rows, device=device)
            logits = model(input_ids=ids[:, :-1]).logits
            nats += F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            tokens += ids[:, 1:].numel()
            n_bytes += int(byte_lengths[rows[:, 1:]].sum())
    print(f"val loss {nats / tokens:.4f}  ppl {math.exp(nats / tokens):.3f}  "
          f"bits/byte {nats / math.log(2) / n_bytes:.4f}  ({tokens:,} tokens)")


def measured(command: list[str]) -> dict:
    """Seconds from start to exit and peak RSS (MiB) of one child process; its output must show success."""
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the largest of all children
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} failed ({os.waitstatus_to_exitcode(status)}):\n{output[-3000:]}")
    found = re.search(r"val loss (\S+)\s+ppl (\S+)", output)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "scores": found.group(0) if found else ""}


def build_reference(root: Path) -> Path:
    out = root / "quickstart"
    print(f"building the reference: tablefree quickstart --steps 1 --out {out}", flush=True)
    done = subprocess.run([sys.executable, "-m", "tablefree.cli", "quickstart", "--out", str(out), "--steps", "1", "--quiet"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"quickstart failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", help="an existing `tablefree quickstart` output (default: build one in a temporary directory)")
    parser.add_argument("--device", default="auto", help=f"where both ways run: {DEVICE_HELP}")
    parser.add_argument("--full-logits", nargs=2, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.full_logits:
        full_logits_scores(*args.full_logits, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        root = Path(args.quickstart) if args.quickstart else build_reference(Path(tmp))
        model, data = str(root / "affine"), str(root / "data")
        ways = {
            "imports": [sys.executable, "-c", IMPORTS],
            "full logits": [sys.executable, __file__, "--full-logits", model, data, "--device", args.device],
            "chunked": [sys.executable, "-m", "tablefree.cli", "eval", model, "--data", data, "--device", args.device,
                        "--dtype", "float32"],
        }
        rows = {name: measured(command) for name, command in ways.items()}
    print(f"{'way':12s} {'seconds':>8s} {'CPU s':>7s} {'peak RSS MiB':>13s}  scores")
    for name, row in rows.items():
        print(f"{name:12s} {row['seconds']:8.1f} {row['cpu_seconds']:7.1f} {row['rss_mib']:13,.0f}  {row['scores']}")
    old, new = rows["full logits"], rows["chunked"]
    print(f"ratio full logits / chunked: peak RSS {old['rss_mib'] / new['rss_mib']:.2f}, "
          f"seconds {old['seconds'] / new['seconds']:.2f}, CPU seconds {old['cpu_seconds'] / new['cpu_seconds']:.2f}")


if __name__ == "__main__":
    main()
