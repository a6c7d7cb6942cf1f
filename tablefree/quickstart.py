"""`tablefree quickstart [--out DIR]`: the paper's comparison in miniature, offline, in a few CPU minutes.

Builds the code-point tokenizer from the embedded corpus (Python's own documentation), prepares the
data, trains a small table-free `affine` model and the `learned`-table baseline of the same size on
identical batches, prints the comparison table, saves both in the Hugging Face form as DIR/affine and
DIR/learned, and answers the model card's prompt through AutoModelForCausalLM.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .errors import TableFreeError

PROMPT = "Question: What is the capital of UK?\nAnswer:"
VARIANTS = ("affine", "learned")
# The `tiny` size: about a minute of training per model on 2 CPU cores; the 65,536-way output head dominates.
SIZE = "tiny"
MODEL = {"max_position_embeddings": 1024}  # the paper's context: rotary positions cost no parameters
STEPS = 80  # optimizer steps per model


def quickstart(out: str | Path, steps: int = STEPS, seed: int = 0, progress: bool = True, force: bool = False,
               device: str = "auto", dtype: str = "auto") -> dict:
    from .data import PrepareSettings, Source, mixture_text, prepare
    from .files import claim_output_dir
    from .tokenizer import as_transformers, build_tokenizer, load_tokenizer
    from .train import TrainConfig, train

    began = time.perf_counter()
    out = claim_output_dir(out, "quickstart", resumable=True, force=force, writes=("data", "runs", *VARIANTS))
    data_dir = out / "data"
    sources = [Source("embedded")]
    print(f"[1/4] code-point tokenizer and data from the embedded corpus -> {data_dir}")
    if (data_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(data_dir / "tokenizer")  # an earlier (maybe interrupted) run's tokenizer
    else:
        tokenizer = as_transformers(build_tokenizer(mixture_text(sources, 1_000_000)))
    manifest = prepare(PrepareSettings(sources=sources, val_fraction=0.02, shard_tokens=1 << 22), data_dir, tokenizer, progress=progress)
    print(f"      {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens "
          f"({manifest['train_bytes'] / manifest['train_tokens']:.2f} bytes per token)")
    base = TrainConfig(
        data=str(data_dir), size=SIZE, model=dict(MODEL), seed=seed, data_seed=seed,
        seq_len=64, batch_size=8, max_steps=steps, lr=1e-2, warmup_steps=10,
        eval_tokens=8192, checkpoint_every=40, log_every=5, progress=progress, device=device, dtype=dtype,
    )
    untrained = untrained_score(base, tokenizer)
    results = {}
    for number, variant in enumerate(VARIANTS, start=2):
        print(f"[{number}/4] training {variant} ({steps} steps x {base.batch_size * base.seq_len} tokens, identical batches)")
        cfg = replace(base, variant=variant, out=str(out / "runs" / variant))
        results[variant] = train(cfg)
        publish_model(Path(cfg.out) / "model", out / variant)
        if not (out / variant / "config.json").is_file():
            raise TableFreeError(f"training {variant} left no model at {out / variant}")
    print(table(results, untrained))
    print("[4/4] the model card's prompt through AutoModelForCausalLM:")
    answer = answer_prompt(out / "affine")
    print(f"      {PROMPT!r} -> {answer!r}")
    print(f"\nchat:   tablefree generate {out / 'affine'} --prompt \"Question: What is a list?\\nAnswer:\"")
    print(f"serve:  tablefree serve {out / 'affine'}   # OpenAI-compatible API on port 30000")
    print(f"eval:   tablefree eval {out / 'affine'} --data {data_dir}")
    print(f"done in {time.perf_counter() - began:.0f} s")
    return {"results": results, "untrained": untrained, "answer": answer}


def publish_model(trained: Path, out: Path) -> None:
    """A copy of the trained model directory at `out` (the run keeps its own, so a rerun finds it finished)."""
    import shutil

    from .files import read_marker, staged_directory
    from .hub import MODEL_KIND

    if not trained.is_dir():
        return
    with staged_directory(out, MODEL_KIND) as stage:
        shutil.copytree(trained, stage.path, dirs_exist_ok=True)
        stage.extra["sha256"] = (read_marker(trained) or {}).get("sha256", {})


def untrained_score(cfg, tokenizer) -> dict:
    """Validation score of the freshly initialised affine model: the baseline that shows learning."""
    from .data import TokenShards
    from .evaluate import evaluate_shards, token_byte_lengths
    from .presets import build_model
    from .runtime import resolve_runtime
    from .train import model_config

    runtime = resolve_runtime(cfg.device, cfg.dtype)  # where the training validates: the scores compare
    config = model_config(replace(cfg, variant="affine"), tokenizer)
    model = build_model(config, seed=cfg.seed).to(runtime.device)
    shards = TokenShards(cfg.data, "val")
    return evaluate_shards(model, shards, cfg.seq_len, cfg.eval_tokens, token_byte_lengths(tokenizer, config.vocab_size),
                           runtime.device, runtime.autocast())


def table(results: dict, untrained: dict) -> str:
    rows = [("model", "val PPL", "bits/byte", "trainable input params", "tokens/s")]
    rows.append(("affine, untrained", f"{untrained['ppl']:,.1f}", f"{untrained['bits_per_byte']:.3f}", "0", "-"))
    for variant, r in results.items():
        speed = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        rows.append((variant, f"{r['val_ppl']:,.1f}", f"{r['val_bits_per_byte']:.3f}", f"{r['trainable_input_params']:,}", speed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n" + "\n".join(lines) + "\n"


def answer_prompt(model_dir: Path, max_new_tokens: int = 12) -> str:
    """Greedy answer through the stock transformers Auto classes, as the model card shows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def quickstart_command(args) -> int:
    from .runtime import resolve_runtime

    if args.steps < 1:
        raise TableFreeError(f"--steps must be at least 1, got {args.steps}")
    runtime = resolve_runtime(args.device, args.dtype)  # a wrong choice is refused before minutes of work
    print(f"running on {runtime.describe()}")
    quickstart(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet, force=args.force,
               device=args.device, dtype=args.dtype)
    return 0


def add_cli(subparsers) -> None:
    from .runtime import add_runtime_flags

    qs = subparsers.add_parser("quickstart")
    qs.add_argument("--out", default="runs/quickstart", help="output directory")
    qs.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per model")
    qs.add_argument("--seed", type=int, default=0, help="model and data seed")
    qs.add_argument("--quiet", action="store_true", help="no progress bars")
    qs.add_argument("--force", action="store_true",
                    help="write into a non-empty OUT that is not a quickstart's; files tablefree did not write are never touched")
    add_runtime_flags(qs)
    qs.set_defaults(run=quickstart_command)
