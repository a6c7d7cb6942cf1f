"""`tablefree compare --config FILE --variants learned,minimal,affine --seeds 0,1,2`: the paper's experiment.

Trains every variant x model seed from one training config at one data seed (so all runs see
identical batches), then writes OUT/results.json, OUT/results.md (the paper's table) and
OUT/loss_curves.png. Each run lives in OUT/VARIANT-seedS and resumes from its checkpoint, so an
interrupted comparison continues where it stopped; finished runs are not retrained.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from .errors import TableFreeError
from .files import atomic_path, claim_output_dir, write_atomic, write_json


def parse_list(text: str, kind=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise TableFreeError(f"empty list {text!r}; give comma-separated values")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise TableFreeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def compare(base, variants: list[str], seeds: list[int], out: str | Path, force: bool = False) -> dict:
    """Train (or resume) every run, then summarise; returns the content of results.json."""
    from .presets import VARIANTS
    from .runtime import process_rank
    from .train import model_config, train

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise TableFreeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    out = Path(out)
    is_main = process_rank().is_main
    if is_main:
        claim_output_dir(out, "compare", resumable=True, force=force, inputs=[base.data, base.tokenizer],
                         writes=("results.json", "results.md", "loss_curves.png",
                                 *(run_name(v, s) for v in variants for s in seeds)))
    configs = {(v, s): replace(base, variant=v, seed=s, out=str(out / run_name(v, s))) for v in variants for s in seeds}
    for cfg in configs.values():
        model_config(cfg)  # every config is checked before hours of training start
    runs = []
    for (variant, seed), cfg in configs.items():
        print(f"== {run_name(variant, seed)} ==")
        runs.append(train(cfg))
    summary = summarise(runs, variants)
    if not is_main:
        return {"runs": runs, "summary": summary}  # under torchrun, rank 0 alone writes the outputs
    results = {"config": {k: v for k, v in vars(base).items() if k not in ("out", "variant", "seed")},
               "variants": variants, "seeds": seeds, "runs": runs, "summary": summary}
    write_json(out / "results.json", results)
    write_atomic(out / "results.md", markdown_table(summary, base, seeds).encode("utf-8"))
    plot_losses(out, variants, seeds)
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: mean +- std of val PPL and bits/byte, seed-to-seed spread, gap to `learned`."""
    summary = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        values = [r["val_ppl"] for r in mine]
        ppl, ppl_std = _mean_std(values)
        bpb, bpb_std = _mean_std([r["val_bits_per_byte"] for r in mine])
        summary[variant] = {
            "val_ppl_mean": ppl, "val_ppl_std": ppl_std, "bits_per_byte_mean": bpb, "bits_per_byte_std": bpb_std,
            "trainable_input_params": mine[0]["trainable_input_params"],
            # (max - min) / mean over seeds: the paper's "seed-to-seed variation"
            "seed_spread": (max(values) - min(values)) / ppl if len(values) > 1 else 0.0,
            "runs": len(mine),
        }
    if "learned" in summary:
        reference = summary["learned"]["val_ppl_mean"]
        for entry in summary.values():
            entry["gap_to_learned"] = entry["val_ppl_mean"] / reference - 1
    return summary


def markdown_table(summary: dict, base, seeds: list[int]) -> str:
    lines = [
        f"# Matched comparison: {base.size} backbone, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
        f"data seed {base.data_seed}, {base.steps() * base.batch_size * base.seq_len:,} tokens per run",
        "",
        "| input interface | val PPL (mean ± std) | bits per byte | trainable input params | seed-to-seed variation | gap to learned |",
        "|---|---|---|---|---|---|",
    ]
    for variant, s in summary.items():
        gap = f"{s['gap_to_learned']:+.1%}" if "gap_to_learned" in s else "n/a"
        lines.append(
            f"| {variant} | {s['val_ppl_mean']:.3f} ± {s['val_ppl_std']:.3f} | "
            f"{s['bits_per_byte_mean']:.4f} ± {s['bits_per_byte_std']:.4f} | {s['trainable_input_params']:,} | "
            f"{s['seed_spread']:.1%} | {gap} |"
        )
    lines += ["", "Seed-to-seed variation: (max - min) / mean validation PPL over seeds. "
              "Gap: mean PPL relative to the learned table (negative = better)."]
    return "\n".join(lines) + "\n"


def plot_losses(out: Path, variants: list[str], seeds: list[int]) -> Path:
    """Training loss against tokens, one colour per variant, one line per seed; val loss as markers."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from .metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, variant in enumerate(variants):
        colour = colours[index % len(colours)]
        for seed in seeds:
            rows = read_metrics(out / run_name(variant, seed) / "metrics.jsonl")
            train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if train:
                ax.plot(*zip(*train), color=colour, alpha=0.8, label=variant if seed == seeds[0] else None)
            if val and train:
                per_step = train[-1][0] / max(1, max(r["step"] for r in rows if "loss" in r))
                ax.scatter([s * per_step for s, _ in val], [v for _, v in val], color=colour, marker="o", s=18)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("training loss (lines) and validation loss (dots)")
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def compare_command(args) -> int:
    from .presets import parse_overrides
    from .runtime import process_rank
    from .train import read_train_config

    overrides = parse_overrides(args.overrides)
    for name in ("device", "dtype"):  # given flags win over the config's settings
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    base = read_train_config(args.config, overrides)
    variants = parse_list(args.variants)
    seeds = parse_list(args.seeds, int)
    out = Path(args.out or base.out)
    compare(base, variants, seeds, out, force=args.force)
    if not process_rank().is_main:
        return 0
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss_curves.png'}")
    return 0


def add_cli(subparsers) -> None:
    from .presets import VARIANTS
    from .runtime import add_runtime_flags

    cmp = subparsers.add_parser("compare")
    cmp.add_argument("--config", required=True, help="YAML training config shared by all runs (see `tablefree train --help`)")
    cmp.add_argument("--variants", default="learned,minimal,affine", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    cmp.add_argument("--seeds", default="0,1,2", help="model seeds (the data seed is the config's, shared)")
    cmp.add_argument("--out", help="output directory (default: the config's out)")
    cmp.add_argument("--force", action="store_true",
                     help="write into a non-empty OUT that is not a comparison's; files tablefree did not write are never touched")
    add_runtime_flags(cmp)
    cmp.set_defaults(device=None, dtype=None)  # unset: the config's device and dtype settings (auto by default)
    cmp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings (see `tablefree train --help`)")
    cmp.set_defaults(run=compare_command)
