"""Training throughput and peak memory: `tablefree train` (affine vs learned) and the HF `Trainer`, one run.

Each configuration trains in its own subprocess (so peak memory is its own) on the same prepared
data, model size and batches. Prints a table, MFU against this machine's measured matmul rate, and
on the last line the headline: table-free (affine) tokens/s over learned-table tokens/s.

    python bench/train.py [--steps 40] [--width 64] [--layers 2]
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


def training_settings(args, data_dir: Path, out: Path, variant: str) -> dict:
    return dict(
        data=str(data_dir), out=str(out), preset=f"tiny-{variant}",
        model={"hidden_size": args.width, "num_hidden_layers": args.layers,
               "num_attention_heads": max(1, args.width // 32), "intermediate_size": 4 * args.width},
        seq_len=args.seq_len, batch_size=args.batch, max_steps=args.steps, lr=1e-3, warmup_steps=5,
        eval_tokens=256, checkpoint_every=0, log_every=10, progress=False, save_model=False,
    )


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_ours(settings: dict) -> dict:
    from tablefree.train import make_config, train

    before = rss_bytes()
    result = train(make_config(settings))
    return {"tokens_per_s": result["tokens_per_s"], "peak_extra_bytes": peak_rss_bytes() - before,
            "peak_rss_bytes": peak_rss_bytes(), "loss": result["train_loss"]}


def run_hf_trainer(settings: dict) -> dict:
    """The same model, optimizer settings and batches through transformers' Trainer."""
    import torch
    from transformers import Trainer, TrainingArguments

    from tablefree.data import TokenShards
    from tablefree.presets import build_model
    from tablefree.train import batch_rows, make_config, model_config

    cfg = make_config(settings)
    shards = TokenShards(cfg.data, "train")
    rows = [row for step in range(cfg.max_steps) for row in batch_rows(shards, cfg, step)]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            ids = torch.from_numpy(rows[i])
            return {"input_ids": ids, "labels": ids}  # the model shifts labels itself

    before = rss_bytes()
    model = build_model(model_config(cfg), seed=cfg.seed)
    arguments = TrainingArguments(
        output_dir=str(Path(cfg.out) / "hf"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine", weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, max_grad_norm=cfg.grad_clip, optim="adamw_torch",
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=Windows())
    began = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - began
    return {"tokens_per_s": cfg.max_steps * cfg.batch_size * cfg.seq_len / seconds,
            "peak_extra_bytes": peak_rss_bytes() - before, "peak_rss_bytes": peak_rss_bytes(), "loss": output.training_loss}


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
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (1 is steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best tokens/s counts")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, settings = args.one[0], json.loads(args.one[1])
        print(json.dumps(run_ours(settings) if kind.startswith("ours") else run_hf_trainer(settings)))
        return

    import torch

    from tablefree.metrics import measured_matmul_flops, training_flops_per_token
    from tablefree.presets import build_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = prepare_data(root)
        plan = {
            "tablefree train, affine": ("ours", "affine"),
            "tablefree train, learned": ("ours", "learned"),
            "HF Trainer, affine": ("hf", "affine"),
        }
        runs: dict[str, dict] = {}
        # Interleaved repeats, best tokens/s of each: a shared machine's load hits all configurations alike.
        for repeat in range(args.repeats):
            for name, (kind, variant) in plan.items():
                r = subprocess_run(kind, training_settings(args, data_dir, root / f"{kind}-{variant}-{repeat}", variant), args.threads)
                if name not in runs or r["tokens_per_s"] > runs[name]["tokens_per_s"]:
                    runs[name] = r
    config = build_config("tiny-affine", hidden_size=args.width, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.width // 32), intermediate_size=4 * args.width)
    flops_per_token = training_flops_per_token(config, args.seq_len)
    peak = measured_matmul_flops(torch.device("cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul reference runs on the same number of threads
    print(f"model: {args.layers} layers x width {args.width}, V = 65,536, seq {args.seq_len} x batch {args.batch}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s; {flops_per_token / 1e6:.1f} MFLOP per trained token\n")
    print(f"| {'run':<26} | {'tokens/s':>9} | {'MFU':>6} | {'peak RSS (MiB)':>14} | {'training RSS (MiB)':>18} | {'final loss':>10} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 8}|{'-' * 16}|{'-' * 20}|{'-' * 12}|")
    for name, r in runs.items():
        mfu = r["tokens_per_s"] * flops_per_token / peak
        print(f"| {name:<26} | {r['tokens_per_s']:>9,.0f} | {mfu:>6.1%} | {r['peak_rss_bytes'] / 2**20:>14,.0f} | "
              f"{r['peak_extra_bytes'] / 2**20:>18,.0f} | {r['loss']:>10.3f} |")
    affine, learned, hf = (runs[k] for k in runs)
    print(f"\naffine / learned tokens/s: {affine['tokens_per_s'] / learned['tokens_per_s']:.2f}x, "
          f"training memory {affine['peak_extra_bytes'] / max(1, learned['peak_extra_bytes']):.2f}x")
    print(f"tablefree train / HF Trainer tokens/s (affine): {affine['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    print(f"ratio {affine['tokens_per_s'] / learned['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
