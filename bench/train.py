"""Training throughput, final validation loss and peak memory: `tablefree train` in float32 and bfloat16, and the HF `Trainer`.

Each configuration trains in its own subprocess (so its peak memory, VmHWM from /proc/self/status,
is its own) on the same prepared data, model size and batches; device and dtype come from
tablefree/runtime.py. Tokens/s is the trainer's own (training steps, wall clock); tokens per CPU
second (the whole run's CPU time, validation included) is steadier on a shared machine. Prints a table, then the ratios the goals are stated in: bfloat16 over float32
tokens/s with the change in final validation loss, our peak training memory over the HF Trainer's
(both float32), affine over learned tokens/s. The headline, alone on the last line: bfloat16 / float32
tokens/s of `tablefree train` (affine).

    python bench/train.py [--steps 60] [--width 64] [--layers 2] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAN = {  # name: (trainer, variant, dtype)
    "tablefree, affine, float32": ("ours", "affine", "float32"),
    "tablefree, affine, bfloat16": ("ours", "affine", "bfloat16"),
    "tablefree, learned, float32": ("ours", "learned", "float32"),
    "tablefree, learned, bfloat16": ("ours", "learned", "bfloat16"),
    "HF Trainer, affine, float32": ("hf", "affine", "float32"),
}


def training_settings(args, data_dir: Path, out: Path, variant: str, dtype: str) -> dict:
    return dict(
        data=str(data_dir), out=str(out), size="tiny", variant=variant, device=args.device, dtype=dtype,
        model={"hidden_size": args.width, "num_hidden_layers": args.layers,
               "num_attention_heads": max(1, args.width // 32), "intermediate_size": 4 * args.width},
        seq_len=args.seq_len, batch_size=args.batch, max_steps=args.steps, lr=args.lr, warmup_steps=5,
        eval_tokens=args.eval_tokens, checkpoint_every=0, log_every=10, progress=False, save_model=False,
    )


def memory_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS now, VmHWM the peak) in bytes: this process's own, unlike ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise SystemExit(f"no {field} in /proc/self/status: this benchmark reads Linux's memory counters")


def cpu_seconds() -> float:
    """CPU time of this process: on a shared machine, steadier than wall time (with one thread, it is the work done)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_ours(settings: dict) -> dict:
    import tablefree.checkpoint, tablefree.data, tablefree.evaluate, tablefree.presets, tablefree.tokenizer  # noqa: F401, E401
    from tablefree.runtime import resolve_runtime
    from tablefree.train import make_config, train

    cfg = make_config(settings)
    runtime = resolve_runtime(cfg.device, cfg.dtype)
    # What train() imports is loaded first, as the HF run loads Trainer first: imports are not training memory.
    before, cpu_before = memory_bytes("VmRSS"), cpu_seconds()
    result = train(cfg)
    peak = memory_bytes("VmHWM")
    return {"tokens_per_s": result["tokens_per_s"], "peak_extra_bytes": peak - before, "peak_rss_bytes": peak,
            "loss": result["train_loss"], "val_loss": result["val_loss"], "runtime": runtime.describe(),
            "tokens_per_cpu_s": result["tokens"] / (cpu_seconds() - cpu_before)}


def run_hf_trainer(settings: dict) -> dict:
    """The same model, optimizer settings and batches through transformers' Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tablefree.data import TokenShards
    from tablefree.presets import build_model
    from tablefree.runtime import resolve_runtime
    from tablefree.train import batch_rows, make_config, model_config

    cfg = make_config(settings)
    runtime = resolve_runtime(cfg.device, cfg.dtype)
    shards = TokenShards(cfg.data, "train")
    rows = [row for step in range(cfg.max_steps) for row in batch_rows(shards, cfg, step)]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids = torch.from_numpy(rows[i])
            return {"input_ids": ids, "labels": ids}  # the model shifts labels itself

    before = memory_bytes("VmRSS")
    model = build_model(model_config(cfg), seed=cfg.seed)
    arguments = TrainingArguments(
        output_dir=str(Path(cfg.out) / "hf"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, max_grad_norm=cfg.grad_clip, optim="adamw_torch",
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=runtime.device.type == "cpu",
        bf16=runtime.dtype == torch.bfloat16, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=Windows())
    began, cpu_before = time.perf_counter(), cpu_seconds()
    output = trainer.train()
    seconds = time.perf_counter() - began
    peak = memory_bytes("VmHWM")
    tokens = cfg.max_steps * cfg.batch_size * cfg.seq_len
    return {"tokens_per_s": tokens / seconds, "peak_extra_bytes": peak - before, "peak_rss_bytes": peak,
            "loss": output.training_loss, "val_loss": None, "runtime": runtime.describe(),
            "tokens_per_cpu_s": tokens / (cpu_seconds() - cpu_before)}


def subprocess_run(kind: str, settings: dict, threads: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, __file__, "--one", kind, json.dumps(settings)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_data(root: Path) -> Path:
    """The interpreter's help topics as a small corpus, tokenised with the code-point tokenizer."""
    from pydoc_data.topics import topics

    from tablefree.data import PrepareSettings, Source, prepare
    from tablefree.tokenizer import as_transformers, build_tokenizer

    texts = [topics[k] for k in sorted(topics) if topics[k].strip()]
    corpus = root / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(PrepareSettings(sources=[Source(str(corpus))], val_fraction=0.05), root / "data",
            as_transformers(build_tokenizer(texts)), progress=False)
    return root / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens behind the final val loss")
    parser.add_argument("--device", default="auto", help="as tablefree train's device setting")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (1 is steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best tokens/s counts")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, settings = args.one[0], json.loads(args.one[1])
        print(json.dumps(run_ours(settings) if kind == "ours" else run_hf_trainer(settings)))
        return

    import torch

    from tablefree.metrics import peak_flops, training_flops_per_token
    from tablefree.presets import sized_config
    from tablefree.runtime import resolve_runtime

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = prepare_data(root)
        runs: dict[str, dict] = {}
        # Interleaved repeats, best tokens/s of each: a shared machine's load hits all configurations alike.
        for repeat in range(args.repeats):
            for name, (kind, variant, dtype) in PLAN.items():
                settings = training_settings(args, data_dir, root / f"{kind}-{variant}-{dtype}-{repeat}", variant, dtype)
                r = subprocess_run(kind, settings, args.threads)
                if name not in runs or r["tokens_per_s"] > runs[name]["tokens_per_s"]:
                    runs[name] = {**r, "tokens_per_cpu_s": max(r["tokens_per_cpu_s"], runs.get(name, r)["tokens_per_cpu_s"])}
                else:
                    runs[name]["tokens_per_cpu_s"] = max(r["tokens_per_cpu_s"], runs[name]["tokens_per_cpu_s"])
    config = sized_config("tiny", "affine", hidden_size=args.width, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.width // 32), intermediate_size=4 * args.width)
    flops_per_token = training_flops_per_token(config, args.seq_len)
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul references run on the same number of threads
    peaks = {dtype: peak_flops(resolve_runtime(args.device, dtype).device, getattr(torch, dtype))[0]
             for dtype in ("float32", "bfloat16")}
    print(f"model: {args.layers} layers x width {args.width}, V = 65,536, seq {args.seq_len} x batch {args.batch}, "
          f"{args.steps} steps, lr {args.lr}, best of {args.repeats}; {runs['tablefree, affine, bfloat16']['runtime']}")
    print(f"peak matmul rate: float32 {peaks['float32'] / 1e9:.1f}, bfloat16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s; "
          f"{flops_per_token / 1e6:.1f} MFLOP per trained token; val loss over {args.eval_tokens:,} tokens\n")
    print(f"| {'run':<28} | {'tokens/s':>9} | {'tokens/CPU-s':>12} | {'MFU':>6} | {'peak RSS (MiB)':>14} | "
          f"{'training RSS (MiB)':>18} | {'train loss':>10} | {'val loss':>8} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 16}|{'-' * 20}|{'-' * 12}|{'-' * 10}|")
    for name, r in runs.items():
        mfu = r["tokens_per_s"] * flops_per_token / peaks[PLAN[name][2]]
        val = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"| {name:<28} | {r['tokens_per_s']:>9,.0f} | {r['tokens_per_cpu_s']:>12,.0f} | {mfu:>6.1%} | {r['peak_rss_bytes'] / 2**20:>14,.0f} | "
              f"{r['peak_extra_bytes'] / 2**20:>18,.0f} | {r['loss']:>10.3f} | {val:>8} |")
    print()
    for variant in ("affine", "learned"):
        fp32, bf16 = runs[f"tablefree, {variant}, float32"], runs[f"tablefree, {variant}, bfloat16"]
        print(f"bfloat16 / float32 ({variant}): tokens/s {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x "
              f"(per CPU second {bf16['tokens_per_cpu_s'] / fp32['tokens_per_cpu_s']:.2f}x), "
              f"final val loss {bf16['val_loss'] / fp32['val_loss'] - 1:+.2%}")
    ours, hf = runs["tablefree, affine, float32"], runs["HF Trainer, affine, float32"]
    print(f"peak training memory tablefree / HF Trainer (affine, float32): {ours['peak_extra_bytes'] / hf['peak_extra_bytes']:.2f}x "
          f"(peak RSS {ours['peak_rss_bytes'] / hf['peak_rss_bytes']:.2f}x); tokens/s {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    print(f"affine / learned tokens/s (float32): {ours['tokens_per_s'] / runs['tablefree, learned, float32']['tokens_per_s']:.2f}x")
    print(f"ratio {runs['tablefree, affine, bfloat16']['tokens_per_s'] / ours['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
