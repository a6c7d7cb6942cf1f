"""`tablefree compare --config FILE --variants learned,minimal,affine --seeds 0,1,2`: the paper's experiment.

Trains every variant x model seed from one training config at one data seed (so all runs see
identical batches), then writes OUT/results.json, OUT/results.md (the paper's table) and
OUT/loss_curves.png. Each run lives in OUT/NAME-seedS and resumes from its checkpoint, so an
interrupted comparison continues where it stopped; finished runs are not retrained.

A variant may carry its own settings: `affine+code_values=bipolar` is the affine variant with one model
field changed, and is its own row of the results. Every variant's gap to a reference variant is given
with a 95% interval over the seeds, paired by seed (the same seed and batches on both sides), so the
table says whether a gap is larger than seed-to-seed noise.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import TableFreeError, WriteError
from .files import atomic_path, claim_output_dir, output_lock, write_atomic, write_error, write_json


def parse_list(text: str, kind=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise TableFreeError(f"empty list {text!r}; give comma-separated values")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise TableFreeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None


DEFAULT_VARIANTS = "learned,minimal,affine"
DEFAULT_SEEDS = "0,1,2"
# Training settings a variant may set for itself. The others define the batches and the run (seed, data,
# seq_len, batch_size, ...) and are shared, so that every variant sees the same data.
PER_VARIANT_SETTINGS = ("lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay",
                        "beta1", "beta2", "grad_clip")
NAME_CHARACTERS = re.compile(r"[A-Za-z0-9_.=+-]+")
# Two-sided 95% quantiles of Student's t by degrees of freedom (n seeds - 1); above 30, the normal's.
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a variant of `presets.VARIANTS` with its own settings, named as written."""

    name: str
    variant: str
    model: dict  # model-field overrides (code_values, code_bits, code_seed, ...)
    settings: dict  # per-variant training settings (PER_VARIANT_SETTINGS)

    def config(self, base, seed: int, out: Path):
        return replace(base, variant=self.variant, seed=seed, model={**base.model, **self.model},
                       out=str(out / run_name(self.name, seed)), **self.settings)


def parse_variant(text: str) -> Variant:
    """`VARIANT[+KEY=VALUE...]`: a variant, then model fields or per-variant training settings (YAML values)."""
    from .presets import VARIANTS, parse_overrides
    from .train import TrainConfig

    name = text.strip()
    if not NAME_CHARACTERS.fullmatch(name):
        raise TableFreeError(f"variant {name!r}: write VARIANT or VARIANT+KEY=VALUE+..., with letters, digits and "
                             f"_ . = + - only (it names the run's directory)")
    # "+" before KEY= separates settings; a "+" inside a value (1e+2) does not.
    variant, *pairs = re.split(r"\+(?=[A-Za-z_][A-Za-z0-9_]*=)", name)
    if variant not in VARIANTS:
        raise TableFreeError(f"unknown variant {variant!r} in {name!r}; choose from {', '.join(VARIANTS)}")
    training = {f.name for f in fields(TrainConfig)}
    model, settings = {}, {}
    for key, value in parse_overrides(pairs).items():
        if key in PER_VARIANT_SETTINGS:
            settings[key] = value
        elif key in training:
            raise TableFreeError(f"variant {name!r}: {key} is shared by every variant (it defines the runs or their "
                                 f"batches); set it in the config. A variant may set model fields and "
                                 f"{', '.join(PER_VARIANT_SETTINGS)}")
        else:
            model[key] = value
    return Variant(name, variant, model, settings)


def parse_variants(text: str | list) -> list[Variant]:
    items = parse_list(text) if isinstance(text, str) else [str(item) for item in text]
    variants = [parse_variant(item) for item in items]
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TableFreeError(f"variant {repeated[0]!r} is listed twice; each variant is one row of the results")
    return variants


def run_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def key_name(key: tuple) -> str:
    """A run's name from its key: (NAME, SEED), or (POINT, NAME, SEED) in a study (POINT/NAME-seedS)."""
    *where, name, seed = key
    return "/".join([*map(str, where), run_name(name, seed)])


def compare(base, variants: list[Variant | str], seeds: list[int], out: str | Path, force: bool = False,
            reference: str | list[str] | None = None, heldout: list[str] = (), jobs: int = 1) -> dict:
    """Train (or resume) every run, then summarise; returns the content of results.json.

    `reference` names the variant(s) the others are measured against (default: learned when compared, else the
    first); with several, each gets its own gap columns (the paper's comparison against learned, ablations against
    affine, in one table).
    `heldout` lists texts of another kind than the training data (files, or `python-notes` or `english-prose`) that every final model
    is also scored on, in bits per byte.
    `jobs` > 1 trains that many runs at once on the CPU, each in its own process with its share of the cores.
    A run that fails does not stop the others: every run is tried, then the failures are reported together
    (finished runs are kept and reused by the next attempt).
    """
    from .data import TokenShards
    from .runtime import process_rank
    from .train import check_given, make_config, model_config

    variants = [v if isinstance(v, Variant) else parse_variant(v) for v in variants]
    names = [v.name for v in variants]
    references = parse_list(reference) if isinstance(reference, str) else list(reference or [])
    references = references or ["learned" if "learned" in names else names[0]]
    outside = [r for r in references if r not in names]
    if outside:
        raise TableFreeError(f"the reference {outside[0]!r} is not among the variants compared ({', '.join(names)})")
    out = Path(out)
    labels = [heldout_label(spec) for spec in heldout]
    if len(set(labels)) < len(labels):
        raise TableFreeError(f"two held-out texts share the name {max(labels, key=labels.count)!r}; give each once, "
                             f"under a name of its own")
    heldout = dict(zip(labels, heldout))
    if heldout and not base.save_model:
        raise TableFreeError("scoring held-out text needs the trained models: set save_model=true")
    configs = {(v.name, s): v.config(base, s, out) for v in variants for s in seeds}
    for cfg in configs.values():  # every config is checked before hours of training start
        model_config(make_config(asdict(cfg), where="a variant"))
    check_given(base)  # and what every run shares (the data, a length): a missing directory is said once
    TokenShards(base.data, "train")
    if jobs > 1:
        check_jobs(configs)
    is_main = process_rank().is_main
    # rank 0 alone writes OUT; each run takes the lock of its own directory (OUT/NAME-seedS), so none waits on this one
    with output_lock(out, inputs=[base.data, base.tokenizer]) if is_main else contextlib.nullcontext():
        if is_main:
            claim_output_dir(out, "compare", resumable=True, force=force, inputs=[base.data, base.tokenizer],
                             writes=("results.json", "results.md", "loss_curves.png", *(run_name(*key) for key in configs)))
        if jobs > 1:
            done, failed = run_in_processes(configs, heldout, jobs)
        else:
            done, failed = {}, {}
            alone = process_rank().world_size == 1  # under torchrun every rank runs every run in step: a failure stops all
            for key, cfg in configs.items():
                print(f"== {run_name(*key)} ==")
                try:
                    done[key] = run_one(cfg, heldout if is_main else {})
                except TableFreeError as exc:
                    if not alone:
                        raise
                    failed[key] = exc
                    print(f"== {run_name(*key)} failed: {exc} ==")
        if failed:  # an error of the environment (a full disk) when every run stopped on one
            environment = all(isinstance(exc, WriteError) for exc in failed.values())
            raise (WriteError if environment else TableFreeError)(failure_report(failed, len(configs)))
        runs = [{"name": name, **done[(name, seed)]} for name, seed in configs]
        if not is_main:
            return {"runs": runs}  # under torchrun, rank 0 alone scores and writes the outputs
        summary = summarise(runs, names, references)
        baselines = {"unigram": unigram_baseline(base, heldout)}
        results = {"config": {k: v for k, v in vars(base).items() if k not in ("out", "variant", "seed")},
                   "variants": [vars(v) for v in variants], "seeds": seeds, "references": references,
                   "heldout": heldout, "baselines": baselines,
                   "runs": runs, "summary": summary}
        write_json(out / "results.json", results)
        write_atomic(out / "results.md", markdown_table(summary, base, seeds, references, baselines).encode("utf-8"))
        plot_losses(out, names, seeds)
        return results


def failure_report(failed: dict, total: int) -> str:
    """One line for the failed runs (their errors by key), each reason once with the runs it stopped."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in failed.items():
        by_reason.setdefault(str(reason), []).append(run_name(*key))
    if len(failed) == total and len(by_reason) == 1:
        return f"every run failed: {next(iter(by_reason))}"
    reasons = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return (f"{len(failed)} of {total} runs failed (the {total - len(failed)} others are finished and are reused when "
            f"the command is run again): {reasons}")


def run_one(cfg, heldout: dict) -> dict:
    """Train (or resume) one run, then score its model on the held-out texts."""
    from .train import train

    result = train(cfg)
    if heldout:
        result["heldout"] = score_heldout(Path(cfg.out) / "model", heldout, cfg)
    return result


def _start_worker(parent: int, threads: int) -> None:
    """A run's process, set up once: its share of the cores, the libraries' bars off (the parent prints one line
    per finished run), Ctrl-C left to the parent (it stops the runs), and an end when the parent is gone."""
    import signal
    import threading
    import time

    import torch

    from .cli import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)  # the parent was killed: stop rather than wait forever (checkpoints are written atomically)

    threading.Thread(target=watch_parent, daemon=True).start()


def check_jobs(configs: dict) -> None:
    from .runtime import process_rank, resolve_runtime

    if process_rank().world_size > 1:
        raise TableFreeError("--jobs runs several runs at once in one machine's processes; under torchrun, leave it at 1")
    if any(resolve_runtime(cfg.device, cfg.dtype).device.type != "cpu" for cfg in configs.values()):
        raise TableFreeError("--jobs shares CPU cores between runs; on a GPU leave it at 1 (or spread one run over "
                             "GPUs with torchrun)")


def run_in_processes(configs: dict, heldout: dict, jobs: int) -> tuple[dict, dict]:
    """Run every config, `jobs` at a time, each in a fresh process with cores // jobs threads.

    Small models use two cores poorly, so on a 2-core CPU two one-thread runs train more tokens per second
    than one two-thread run (bench/compare_jobs.py measures it). Returns (results, errors) by key.
    """
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from .errors import summary

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    print(f"== {len(configs)} runs, {jobs} at a time, {threads} thread{'s' * (threads > 1)} each ==", flush=True)
    done, failed, start = {}, {}, time.monotonic()
    # spawn, not fork: a forked child of a process whose OpenMP threads have run can hang in its first matmul
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(), threads))
    try:
        futures = {pool.submit(run_one, replace(cfg, progress=False), heldout): key for key, cfg in configs.items()}
        for future in as_completed(futures):
            key = futures[future]
            try:
                done[key] = result = future.result()
            except TableFreeError as exc:
                failed[key] = exc
            except BrokenProcessPool:
                failed[key] = TableFreeError("a run's process died (killed, or out of memory), and with it the pool of "
                                             "processes")
            except Exception as exc:  # a fault of one run is reported with the others, never spread to them
                failed[key] = TableFreeError(summary(exc, typed=True))
            elapsed = time.monotonic() - start
            status = (f"failed: {failed[key]}" if key in failed else
                      f"val {result['val_bits_per_byte']:.3f} bits/byte")
            print(f"== {key_name(key)} {status} ({len(done) + len(failed)}/{len(configs)}, {elapsed:.0f} s) ==",
                  flush=True)
    except BaseException:  # Ctrl-C or a fault here: stop the runs now (each resumes from its checkpoint)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return done, failed


PUBLISHED = ("results.md", "results.json", "loss_curves.png", "gaps.png")


def publish(out: Path, dest: str | Path, command: str, force: bool = False) -> Path:
    """The finished comparison in OUT, as a study to commit: tables, plots, the command, the commit and the machine.

    DEST receives only PUBLISHED (no checkpoints or models); rerunning the command republishes over its own files.
    """
    import shutil

    from .files import read_json

    with output_lock(dest, inputs=[out]):
        dest = claim_output_dir(dest, "results", resumable=True, force=force, inputs=[out], writes=PUBLISHED)
        results = read_json(out / "results.json", "the comparison's results")
        hours = sum(r["tokens"] / r["tokens_per_s"] for r in results["runs"] if r.get("tokens_per_s")) / 3600
        provenance = {"command": command, "commit": source_commit(), "machine": machine(),
                      "training_hours": round(hours, 3)}
        write_json(dest / "results.json", {"provenance": provenance, **results})
        table = (out / "results.md").read_text(encoding="utf-8")
        header = (f"Generated by `{command}` at commit `{provenance['commit']}` on {provenance['machine']}; "
                  f"the runs' training time adds up to {hours * 60:.0f} minutes (resumed pieces counted once each; runs "
                  f"trained at once under --jobs overlap in wall-clock time).\n\n")
        write_atomic(dest / "results.md", (header + table).encode("utf-8"))
        with atomic_path(dest / "loss_curves.png") as tmp:
            shutil.copyfile(out / "loss_curves.png", tmp)
        plot_gaps(dest / "gaps.png", results["summary"], results["references"][0])
        print(f"published {', '.join(str(dest / name) for name in PUBLISHED)}")
        return dest


def source_commit() -> str:
    """The git commit this package runs from (with `+changes` when its files differ), or `unknown`."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown (not a git checkout)"
    return commit.stdout.strip()[:12] + ("+changes" if dirty.stdout.strip() else "")


def machine() -> str:
    import platform

    import torch

    from .runtime import cpu_info

    model = cpu_info("model name") or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model} ({os.cpu_count()} CPUs, torch {threads} threads{gpu}), torch {torch.__version__}"


def plot_gaps(path: Path, summary: dict, reference: str) -> Path:
    """Each variant's validation-PPL gap to the reference with its 95% interval over seeds (a forest plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if reference in summary[n]["gaps"]]
    gaps = [summary[n]["gaps"][reference] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    ys = list(range(len(names)))[::-1]
    errors = [100 * (g["ci95"] or 0) for g in gaps]
    ax.errorbar([100 * g["mean"] for g in gaps], ys, xerr=errors, fmt="o", color="black", ecolor="gray", capsize=3)
    ax.axvline(0, color="tab:blue", linewidth=1)
    ax.set_yticks(ys, names)
    ax.set_xlabel(f"validation PPL gap to {reference}, %")
    ax.set_title("mean over seeds, bars: 95% interval of the paired gap; left of the line is better", fontsize=9)
    return save_png(fig, path)


def heldout_label(spec: str) -> str:
    from .corpus import HELDOUT_TEXTS

    if spec in HELDOUT_TEXTS:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise TableFreeError(f"held-out text {spec!r}: no such file; give .txt/.jsonl/.parquet files or "
                             f"{' or '.join(HELDOUT_TEXTS)}")
    return path.name


def score_heldout(model_dir: Path, heldout: dict, cfg) -> dict:
    """Bits per byte (and tokens) of one trained model on each held-out text, windows of the run's seq_len."""
    from .evaluate import evaluate_model
    from .runtime import resolve_runtime

    runtime = resolve_runtime(cfg.device, cfg.dtype)
    scores = {}
    for label, spec in heldout.items():
        result = evaluate_model(str(model_dir), spec, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens, runtime=runtime)
        scores[label] = {"bits_per_byte": result["bits_per_byte"], "tokens": result["tokens"]}
    return scores


def unigram_baseline(base, heldout: dict) -> dict:
    """The training split's token frequencies as a model, scored as every run is: the level a model reaches
    without using the context, which the trained models are read against."""
    from .evaluate import context_free_scores, data_windows, token_byte_lengths, unigram_log_probs
    from .tokenizer import load_tokenizer
    from .train import model_config

    tokenizer = load_tokenizer(base.tokenizer or Path(base.data) / "tokenizer")
    vocab = model_config(base, tokenizer).vocab_size
    byte_lengths = token_byte_lengths(tokenizer, vocab)
    log_probs = unigram_log_probs(base.data, vocab)

    def scores(data: str) -> dict:
        return context_free_scores(data_windows(data, tokenizer, base.seq_len, base.eval_tokens), log_probs, byte_lengths)

    val = scores(str(base.data))
    held = {label: scores(spec) for label, spec in heldout.items()}
    return {"val_loss": val["loss"], "val_ppl": val["ppl"], "val_bits_per_byte": val["bits_per_byte"],
            "heldout": {label: {"bits_per_byte": h["bits_per_byte"], "tokens": h["tokens"]} for label, h in held.items()}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_gap(values: list[float], reference: list[float]) -> dict:
    """Relative gap value/reference - 1, seed by seed: its mean and the half-width of its 95% interval."""
    gaps = [v / r - 1 for v, r in zip(values, reference)]
    mean = statistics.fmean(gaps)
    if len(gaps) < 2:
        return {"mean": mean, "ci95": None, "within_noise": None}
    df = len(gaps) - 1
    t = T_95[max(k for k in T_95 if k <= df)] if df <= 30 else 1.960
    half = t * statistics.stdev(gaps) / math.sqrt(len(gaps))
    return {"mean": mean, "ci95": half, "within_noise": abs(mean) <= half}


def summarise(runs: list[dict], names: list[str], references: list[str] | None = None) -> dict:
    """Per variant: mean +- std of val PPL and bits/byte, seed-to-seed spread, paired gaps to each reference."""
    references = references or [names[0]]
    by_name = {name: sorted((r for r in runs if r.get("name", r["variant"]) == name), key=lambda r: r["seed"])
               for name in names}
    summary = {}
    for name in names:
        mine = by_name[name]
        values = [r["val_ppl"] for r in mine]
        ppl, ppl_std = _mean_std(values)
        bpb, bpb_std = _mean_std([r["val_bits_per_byte"] for r in mine])
        summary[name] = {
            "variant": mine[0]["variant"], "seeds": [r["seed"] for r in mine],
            "val_ppl_mean": ppl, "val_ppl_std": ppl_std, "bits_per_byte_mean": bpb, "bits_per_byte_std": bpb_std,
            "trainable_input_params": mine[0]["trainable_input_params"],
            # (max - min) / mean over seeds: the paper's "seed-to-seed variation"
            "seed_spread": (max(values) - min(values)) / ppl if len(values) > 1 else 0.0,
            "runs": len(mine), "gaps": {},
        }
        for label in mine[0].get("heldout", {}):
            mean, std = _mean_std([r["heldout"][label]["bits_per_byte"] for r in mine])
            summary[name].setdefault("heldout", {})[label] = {"bits_per_byte_mean": mean, "bits_per_byte_std": std}
    for reference in references:
        ref_runs = {r["seed"]: r for r in by_name[reference]}
        for name in names:
            paired = [(r["val_ppl"], ref_runs[r["seed"]]["val_ppl"]) for r in by_name[name] if r["seed"] in ref_runs]
            if paired:
                summary[name]["gaps"][reference] = paired_gap(*map(list, zip(*paired)))
    return summary


def markdown_table(summary: dict, base, seeds: list[int], references: list[str], baselines: dict | None = None) -> str:
    labels = list(next(iter(summary.values())).get("heldout", {}))
    lines = [
        f"# Matched comparison: {base.size} backbone, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
        f"data seed {base.data_seed}, {base.steps() * base.batch_size * base.seq_len:,} tokens per run "
        f"({base.steps():,} steps of {base.batch_size} x {base.seq_len})",
        "",
        "| input interface | val PPL (mean ± std) | val bits per byte | "
        + "".join(f"{label} bits per byte | " for label in labels)
        + "trainable input params | seed-to-seed variation | "
        + "".join(f"gap to {reference} (95% CI) | beyond noise? | " for reference in references).rstrip(),
        "|---|---|---|" + "---|" * len(labels) + "---|---|" + "---|---|" * len(references),
    ]
    for name, s in summary.items():
        cells = [name, f"{s['val_ppl_mean']:.3f} ± {s['val_ppl_std']:.3f}",
                 f"{s['bits_per_byte_mean']:.4f} ± {s['bits_per_byte_std']:.4f}"]
        cells += [f"{h['bits_per_byte_mean']:.4f} ± {h['bits_per_byte_std']:.4f}" for h in s.get("heldout", {}).values()]
        cells += [f"{s['trainable_input_params']:,}", f"{s['seed_spread']:.1%}"]
        for reference in references:
            gap = s["gaps"].get(reference)
            if gap is None:
                cells += ["n/a", "n/a"]
                continue
            cells.append(f"{gap['mean']:+.1%}" + (f" ± {gap['ci95']:.1%}" if gap["ci95"] is not None else ""))
            if name == reference:
                cells.append("reference")
            elif gap["within_noise"] is None:
                cells.append("n/a: one seed")
            else:
                cells.append("no: within noise" if gap["within_noise"] else ("yes: worse" if gap["mean"] > 0 else "yes: better"))
        lines.append("| " + " | ".join(cells) + " |")
    unigram = (baselines or {}).get("unigram")
    if unigram:
        cells = ["unigram (no model)", f"{unigram['val_ppl']:.3f}", f"{unigram['val_bits_per_byte']:.4f}"]
        cells += [f"{unigram['heldout'][label]['bits_per_byte']:.4f}" if label in unigram["heldout"] else "n/a"
                  for label in labels]
        lines.append("| " + " | ".join(cells + ["–"] * (2 + 2 * len(references))) + " |")
    lines += ["", "Seed-to-seed variation: (max - min) / mean validation PPL over seeds. Gap: validation PPL relative "
              "to the reference, seed by seed (same seed, same batches), as mean ± the half-width of its 95% "
              "t-interval over seeds; negative = better. A gap whose interval holds 0 is within seed-to-seed noise."]
    if unigram:
        lines += ["Unigram: each token's frequency in the training split (add-half smoothed) as the prediction, "
                  "whatever came before; a model below it uses the context."]
    return "\n".join(lines) + "\n"


def plot_losses(out: Path, variants: list[str], seeds: list[int], run_dir=None) -> Path:
    """Training loss against tokens, one line per variant (mean over seeds, smoothed); final val loss as dots.

    One logged step is one batch's loss, which at small batches is noise as large as the gaps; the moving
    average over about 1/25 of the run shows the trend. `run_dir(variant, seed)` is where a run's
    metrics.jsonl lies (default: OUT/NAME-seedS).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    from .metrics import read_metrics

    fig, ax = plt.subplots(figsize=(10, 5))
    colours = plt.get_cmap("tab20" if len(variants) > 10 else "tab10").colors
    window, shown = 1, []
    for index, variant in enumerate(variants):
        curves, finals = [], []
        for seed in seeds:
            rows = read_metrics((run_dir or (lambda v, s: out / run_name(v, s)))(variant, seed) / "metrics.jsonl")
            curves.append({r["tokens"]: r["loss"] for r in rows if "loss" in r})
            finals += [r["val_loss"] for r in rows if "val_loss" in r][-1:]
        tokens = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not tokens:
            continue
        mean = np.array([np.mean([c[t] for c in curves]) for t in tokens])
        window = max(1, len(tokens) // 25)
        smooth = np.convolve(mean, np.ones(window) / window, mode="valid")  # trailing mean of `window` points
        colour = colours[index % len(colours)]
        ax.plot(tokens[window - 1 :], smooth, color=colour, linewidth=1.4, label=variant)
        if finals:
            ax.scatter([tokens[-1]], [np.mean(finals)], color=colour, marker="o", s=24, zorder=3)
        shown.append(smooth)
    if shown:  # from the lowest curve to where the highest stands a tenth into training: the learning, not the start
        low = min(c.min() for c in shown)
        high = max(c[min(len(c) - 1, len(c) // 10)] for c in shown)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low) if high > low else low + 1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"training loss, mean over {len(seeds)} seed(s), moving average of {window} logged steps; "
                 f"dots: final validation loss", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return save_png(fig, out / "loss_curves.png")


def save_png(fig, path: Path) -> Path:
    """`fig` written atomically as a PNG at `path`, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    except OSError as exc:
        raise write_error(str(path), exc) from None
    finally:
        plt.close(fig)
    return path


COMPARE_KEYS = ("variants", "seeds", "reference", "heldout")  # what a compare config holds beside the training settings


def read_command_config(args, keys) -> tuple[dict, dict, dict]:
    """A comparison's or a study's config: (its training settings, its own `keys`, the overrides the flags give)."""
    from .presets import parse_overrides
    from .train import read_settings_file

    values = read_settings_file(args.config)
    own = {key: values.pop(key) for key in keys if key in values}
    overrides = parse_overrides(args.overrides)
    for name in ("device", "dtype"):  # given flags win over the config's settings
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return values, own, overrides


def checked_settings(args, own: dict, heldout_flag=None) -> tuple[list[int], list[str]]:
    """The seeds and held-out texts of a comparison or study (a flag wins over the config), checked, and --jobs."""
    seeds = args.seeds or own.get("seeds", DEFAULT_SEEDS)
    seeds = parse_list(seeds, int) if isinstance(seeds, str) else seeds
    if not (isinstance(seeds, list) and seeds and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise TableFreeError(f"seeds in {args.config} must be a list of integers, got {seeds!r}")
    heldout = heldout_flag or own.get("heldout", [])
    heldout = [heldout] if isinstance(heldout, str) else heldout
    if not (isinstance(heldout, list) and all(isinstance(x, str) for x in heldout)):
        raise TableFreeError(f"heldout in {args.config} must be a list of file paths, python-notes or english-prose, "
                             f"got {heldout!r}")
    if not 1 <= args.jobs <= 256:
        raise TableFreeError(f"--jobs must be between 1 and 256 runs at once, got {args.jobs}")
    return seeds, heldout


def print_written(out: Path, figure: str) -> None:
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / figure}")


def compare_command(args) -> int:
    from .runtime import process_rank
    from .train import train_config_from

    values, study, overrides = read_command_config(args, COMPARE_KEYS)
    base = train_config_from(values, overrides, where=str(args.config))
    variants = parse_variants(args.variants or study.get("variants", DEFAULT_VARIANTS))
    seeds, heldout = checked_settings(args, study, args.heldout)
    reference = args.reference or study.get("reference")
    if reference is not None and not isinstance(reference, (str, list)):
        raise TableFreeError(f"reference in {args.config} must be a variant name or a list of them, got {reference!r}")
    out = Path(args.out or base.out)
    compare(base, variants, seeds, out, force=args.force, reference=reference, heldout=heldout, jobs=args.jobs)
    if not process_rank().is_main:
        return 0
    if args.publish:
        publish(out, args.publish, args.command_line, force=args.force)
    print_written(out, "loss_curves.png")
    return 0


def add_cli(subparsers) -> None:
    from .presets import VARIANTS
    from .runtime import add_runtime_flags

    cmp = subparsers.add_parser("compare")
    cmp.add_argument("--config", required=True,
                     help="YAML training config shared by all runs (see `tablefree train --help`); it may also hold "
                          "variants, seeds and reference (the flags win)")
    cmp.add_argument("--variants", default=None,
                     help=f"comma-separated VARIANT[+KEY=VALUE...], VARIANT from {', '.join(VARIANTS)}, KEY a model field "
                          f"(code_values, code_bits, code_seed, code_layout, code_scale, ...) or one of "
                          f"{', '.join(PER_VARIANT_SETTINGS)}; e.g. learned,affine,affine+code_values=bipolar "
                          f"(default: {DEFAULT_VARIANTS})")
    cmp.add_argument("--seeds", default=None, help=f"model seeds, crossed with every variant; the data seed is the "
                                                   f"config's, shared (default: {DEFAULT_SEEDS})")
    cmp.add_argument("--reference", default=None,
                     help="the variant(s) the others' gaps are measured against, comma-separated, each with its own "
                          "columns (default: learned if compared, else the first)")
    cmp.add_argument("--heldout", action="append", default=None, metavar="TEXT",
                     help="also score every final model on this text, in bits per byte: a .txt/.jsonl/.parquet file, "
                          "python-notes (IDLE's change logs and Python's licence, on every machine) or english-prose "
                          "(original English prose that ships with tablefree); repeatable")
    cmp.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="train N runs at once on the CPU, each in its own process with cores/N threads; small "
                          "models train more tokens per second this way (default: 1)")
    cmp.add_argument("--out", help="output directory (default: the config's out)")
    cmp.add_argument("--publish", metavar="DIR", help="then copy the study to DIR to commit: results.md and results.json "
                                                      "with the command, commit and machine, loss_curves.png, gaps.png")
    cmp.add_argument("--force", action="store_true",
                     help="write into a non-empty OUT that is not a comparison's; files tablefree did not write are never touched")
    add_runtime_flags(cmp)
    cmp.set_defaults(device=None, dtype=None)  # unset: the config's device and dtype settings (auto by default)
    cmp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings (see `tablefree train --help`)")
    cmp.set_defaults(run=compare_command)
