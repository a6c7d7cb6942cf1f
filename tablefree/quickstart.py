"""`tablefree quickstart [--out DIR]`: the paper's comparison in miniature, offline, in a few CPU minutes.

Builds the code-point tokenizer from Python's own documentation (the embedded corpus) and the English
prose that ships with tablefree (corpus.PROSE), prepares the data, trains a small table-free `affine`
model and the `learned`-table baseline of the same size on identical batches, and prints what a
person wants to see: bits per byte on the validation split and on held-out text of another kind,
beside the uniform, unigram and untrained baselines that give them meaning; the gap between the two
models; the loss curves (OUT/loss_curves.png, and in the terminal); and a sampled continuation through
AutoModelForCausalLM from the saved DIR/affine.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from .errors import TableFreeError

PROMPT = "This module provides"  # how many of the corpus's module docstrings begin
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 60}
VARIANTS = ("affine", "learned")
# The `tiny` size: the 65,536-way output head is most of its compute, so a wider model costs about as much more
# per token as it is wider; at this width the budget buys the most tokens. At a budget this small the models are
# limited by their number of updates, so many small steps beat few large ones (docs/study.md). Whole quickstart on 2
# idle cores, held-out python-notes bits per byte of affine / learned: 90 steps of 16 x 128, 156 s, 3.541 / 3.448;
# 330 steps of 4 x 128 (168,960 tokens per model), 142 s, 3.472 / 3.316; 540 steps of 2 x 128, 157 s, 3.492 /
# 3.381; 600 steps of 2 x 128, 159 s, 3.424 / 3.311. 4 x 128 is the fastest and among the best. lr 5e-3 was best of
# 2.5e-3, 5e-3, 1e-2 and 2e-2 (affine, 100 steps of 16 x 128) and better than 2.5e-3 at 2 x 128 (docs/study.md).
SIZE = "tiny"
MODEL = {"max_position_embeddings": 1024}  # the paper's context: rotary positions cost no parameters
STEPS = 330  # optimizer steps per model
TRAINING = dict(seq_len=128, batch_size=4, lr=5e-3, warmup_steps=20, eval_tokens=8192, checkpoint_every=110, log_every=10)
VAL_FRACTION = 0.02
# What the models read: Python's documentation (the embedded corpus) and the English prose that ships with tablefree
# (corpus.PROSE), 2:1 by weight in a budget above the 168,960 tokens that 330 steps read: 180,023 train tokens of
# the first and all 82,645 of the second. Held-out bits per byte of affine / learned, one seed each, on
# python-notes, then english-prose: these weights, 3.745 / 3.667, then 2.658 / 2.459; half each in 240,000 tokens,
# 3.940 / 3.827, then 2.572 / 2.363; the embedded corpus alone, 3.470 / 3.312, then 3.519 for affine. Prose to train
# on is what brings English prose under 3 bits per byte; 2:1 keeps both models below unigram on python-notes (3.767).
SOURCES = (("embedded", 2 / 3), ("prose", 1 / 3))
BUDGET_TOKENS = 270_000
HELDOUT = ("python-notes", "english-prose")  # corpus.PYTHON_NOTES and corpus.ENGLISH_PROSE, scored after training
TRENDS = ("\nOne seed at one small budget is not the conclusion. Here the table is about half of the parameters and "
          "each model sees a few hundred thousand tokens; in the paper it is 12.5% and 17 billion. Whether the gap "
          "shrinks as training grows and as the table's share falls is what the trend studies measure, over three "
          "seeds with 95% intervals: docs/study.md in the tablefree repository, with its plots "
          "docs/results-tokens/gaps.png (the gap against training tokens) and docs/results-share/gaps.png (against "
          "the table's share, and at equal parameters).")
ABILITY = ("What a minutes-old model can do: it has learned spelling, common words and the look of Python's "
           "documentation and of English prose, not facts or instructions, so it will not answer questions. What the "
           "quickstart measures is the paper's question: how close fixed codes with no input parameter come to a "
           "trained table (the gap above).")


def quickstart(out: str | Path, steps: int = STEPS, seed: int = 0, progress: bool = True, force: bool = False,
               device: str = "auto", dtype: str = "auto") -> dict:
    from .compare import score_heldout
    from .corpus import ENGLISH_PROSE, PYTHON_NOTES
    from .data import PrepareSettings, Source, mixture_text, prepare
    from .files import claim_output_dir, output_lock
    from .tokenizer import as_transformers, build_tokenizer, load_tokenizer
    from .train import TrainConfig, train

    began = time.perf_counter()
    with output_lock(out):
        out = claim_output_dir(out, "quickstart", resumable=True, force=force,
                               writes=("data", "runs", "loss_curves.png", *VARIANTS,
                                       *(f"runs/{variant}" for variant in VARIANTS)))
        data_dir = out / "data"
        sources = [Source(spec, weight) for spec, weight in SOURCES]
        print(f"[1/5] code-point tokenizer and data from Python's documentation and English prose -> {data_dir}")
        if (data_dir / "tokenizer" / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(data_dir / "tokenizer")  # an earlier (maybe interrupted) run's tokenizer
        else:
            tokenizer = as_transformers(build_tokenizer(mixture_text(sources, 1_000_000)))
        with output_lock(data_dir):
            manifest = prepare(PrepareSettings(sources=sources, val_fraction=VAL_FRACTION, shard_tokens=1 << 22,
                                               budget_tokens=BUDGET_TOKENS),
                               data_dir, tokenizer, progress=progress)
        print(f"      {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens "
              f"({manifest['train_bytes'] / manifest['train_tokens']:.2f} bytes per token)")
        base = TrainConfig(data=str(data_dir), size=SIZE, model=dict(MODEL), seed=seed, data_seed=seed, max_steps=steps,
                           progress=progress, device=device, dtype=dtype, **TRAINING)
        print(f"[2/5] baselines: uniform, unigram and untrained, on the validation split and on two texts of another "
              f"kind, never trained on: {PYTHON_NOTES} (IDLE's change logs and Python's licence) and {ENGLISH_PROSE} "
              f"(stories, letters and essays written for tablefree, other than the prose it trains on)")
        scores = baseline_scores(base, tokenizer)
        results = {}
        for number, variant in enumerate(VARIANTS, start=3):
            print(f"[{number}/5] training {variant} ({steps} steps x {base.batch_size * base.seq_len:,} tokens, identical batches)")
            cfg = replace(base, variant=variant, out=str(out / "runs" / variant))
            try:
                results[variant] = train(cfg)
            except TableFreeError as exc:  # e.g. a quickstart of an earlier version, with other settings, lies in OUT
                raise TableFreeError(f"{exc} (the quickstart: `tablefree quickstart --out NEW_DIR` starts afresh "
                                     f"elsewhere)") from None
            publish_model(Path(cfg.out) / "model", out / variant)
            if not (out / variant / "config.json").is_file():
                raise TableFreeError(f"training {variant} left no model at {out / variant}")
            held = score_heldout(out / variant, {text: text for text in HELDOUT}, base)
            scores[variant] = {"val": _val_score(results[variant]), **held}
        print(table(scores, results))
        print(explain(scores))
        curves = plot_curves(out)
        print(f"loss curves: {curves}")
        print(terminal_curves(out))
        print(f"[5/5] a sampled continuation from {out / 'affine'} through AutoModelForCausalLM "
              f"(temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, seed {seed}):")
        continuation = continue_prompt(out / "affine", seed)
        print(f"      {PROMPT}{continuation}")
        print(wrapped(ABILITY))
        print(f"\nchat:   tablefree generate {out / 'affine'} --prompt \"{PROMPT}\" --temperature 0.8")
        print(f"serve:  tablefree serve {out / 'affine'}   # OpenAI-compatible API on port 30000")
        print(f"eval:   tablefree eval {out / 'affine'} --data {ENGLISH_PROSE}")
        print(wrapped(TRENDS))
        print(f"done in {time.perf_counter() - began:.0f} s")
        return {"results": results, "scores": scores, "continuation": continuation}


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


def _val_score(result: dict) -> dict:
    return {"loss": result["val_loss"], "ppl": result["val_ppl"], "bits_per_byte": result["val_bits_per_byte"]}


def baseline_scores(cfg, tokenizer) -> dict:
    """Uniform, unigram and untrained scores on the validation split and on the held-out text, as training scores."""
    import numpy as np

    from .evaluate import context_free_scores, data_windows, evaluate_windows, token_byte_lengths, unigram_log_probs
    from .presets import build_model
    from .runtime import resolve_runtime
    from .train import model_config

    runtime = resolve_runtime(cfg.device, cfg.dtype)  # where the training validates: the scores compare
    config = model_config(replace(cfg, variant="affine"), tokenizer)
    vocab = config.vocab_size
    byte_lengths = token_byte_lengths(tokenizer, vocab)
    # Each text's windows once, as training's validation and `score_heldout` cut them; every baseline scores the same.
    windows = {text: list(data_windows(data, tokenizer, cfg.seq_len, cfg.eval_tokens))
               for text, data in (("val", str(cfg.data)), *((name, name) for name in HELDOUT))}
    scores = {}
    context_free = {"uniform": np.full(vocab, -math.log(vocab)), "unigram": unigram_log_probs(cfg.data, vocab)}
    for name, log_probs in context_free.items():
        scores[name] = {text: context_free_scores(cut, log_probs, byte_lengths) for text, cut in windows.items()}
    model = build_model(config, seed=cfg.seed).to(runtime.device)
    scores["untrained"] = {text: evaluate_windows(model, cut, byte_lengths, runtime.device, runtime.autocast())
                           for text, cut in windows.items()}
    return scores


ROW_NAMES = {"uniform": "uniform over all ids", "unigram": "unigram (token frequencies)",
             "untrained": "affine, untrained", "affine": "affine (fixed codes)", "learned": "learned (table)"}


def table(scores: dict, results: dict) -> str:
    rows = [("model", "val bits/byte", *(f"{text} bits/byte" for text in HELDOUT), "val PPL", "trainable input params",
             "tokens/s")]
    for name, score in scores.items():
        result = results.get(name, {})
        params = f"{result['trainable_input_params']:,}" if result else ("0" if name == "untrained" else "-")
        speed = f"{result['tokens_per_s']:,.0f}" if result.get("tokens_per_s") else "-"
        rows.append((ROW_NAMES[name], f"{score['val']['bits_per_byte']:.3f}",
                     *(f"{score[text]['bits_per_byte']:.3f}" for text in HELDOUT), f"{score['val']['ppl']:,.1f}", params,
                     speed))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n" + "\n".join(lines) + "\n"


def explain(scores: dict) -> str:
    """What the table means, in words, from its own numbers."""
    val = {name: s["val"]["bits_per_byte"] for name, s in scores.items()}
    gap = scores["affine"]["val"]["ppl"] / scores["learned"]["val"]["ppl"] - 1
    below = [n for n in VARIANTS if val[n] < val["unigram"]]
    lines = [
        "Bits per byte: the bits each model needs per byte of text (lower is better; it compares across tokenizers).",
        f"Uniform ({val['uniform']:.2f}) is guessing among all ids; unigram ({val['unigram']:.2f}) knows only how often "
        f"each token occurs; a model below unigram uses the context.",
        (f"Both models are below unigram on the validation split, by {val['unigram'] - val['affine']:.2f} (affine) and "
         f"{val['unigram'] - val['learned']:.2f} (learned) bits per byte." if len(below) == len(VARIANTS) else
         f"Below unigram on the validation split: {', '.join(below) or 'neither model yet'}."),
        f"The fixed codes against the table: affine (no trainable input parameter) has a validation PPL {gap:+.1%} "
        f"relative to learned (a trainable table). One seed each cannot say whether such a gap is noise; "
        f"`tablefree compare` measures it over seeds.",
    ]
    for text in HELDOUT:
        if not all(text in s for s in scores.values()):
            continue
        held = {name: s[text]["bits_per_byte"] for name, s in scores.items()}
        lines.insert(-1, f"On {text}, text of another kind (what transfers beyond the training corpus): "
                     + "; ".join(f"{n} {held[n]:.2f}, {'below' if held[n] < held['unigram'] else 'not yet below'} "
                                 f"unigram's {held['unigram']:.2f}" for n in VARIANTS) + ".")
    return "\n".join(wrapped(line) for line in lines) + "\n"


def wrapped(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)


def plot_curves(out: Path) -> Path:
    from .compare import plot_losses

    return plot_losses(out, list(VARIANTS), [0], run_dir=lambda variant, seed: out / "runs" / variant)


BARS = "▁▂▃▄▅▆▇█"


def terminal_curves(out: Path, width: int = 40) -> str:
    """The training loss of each model as one line of block characters, on a shared scale."""
    from .metrics import read_metrics

    series = {}
    for variant in VARIANTS:
        losses = [r["loss"] for r in read_metrics(out / "runs" / variant / "metrics.jsonl") if "loss" in r]
        if losses:
            step = max(1, math.ceil(len(losses) / width))
            series[variant] = [sum(losses[i : i + step]) / len(losses[i : i + step]) for i in range(0, len(losses), step)]
    if not series:
        return ""
    low = min(min(v) for v in series.values())
    high = max(max(v) for v in series.values())
    scale = (len(BARS) - 1) / (high - low) if high > low else 0.0
    lines = [f"      training loss (nats/token), {low:.2f} to {high:.2f}:"]
    for variant, values in series.items():
        bars = "".join(BARS[round((v - low) * scale)] for v in values)
        lines.append(f"      {variant:8s} {values[0]:6.2f} {bars} {values[-1]:.2f}")
    return "\n".join(lines)


def continue_prompt(model_dir: Path, seed: int) -> str:
    """A sampled continuation through the stock transformers Auto classes, as the model card shows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, **SAMPLING, pad_token_id=tokenizer.pad_token_id)
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
