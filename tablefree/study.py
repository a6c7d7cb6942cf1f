"""`tablefree study --config FILE --jobs 2 --publish DIR`: the matched comparison repeated along one axis.

A study is one comparison (variants x seeds on identical batches, as `tablefree compare`) at each of several
points: token budgets, vocabularies and body sizes. Its question is a trend: does the gap between fixed codes
and a learned table shrink as training grows, as the table's share of the parameters falls, or when the
table-free model spends the table's parameters in its body? The config is a compare config with `points`:

    points:
      - {name: 65k, max_steps: 256, warmup_steps: 16}          # any training setting; model: {...} merges
      - {name: 1m, max_steps: 4096, warmup_steps: 256}
      - {name: wide, variants: [learned, affine, affine+hidden_size=124+intermediate_size=496]}

Every run lives in OUT/POINT/NAME-seedS and resumes from its checkpoint; finished runs are never retrained, so
a study runs piece by piece and `--points` picks some. OUT/results.json holds every point's figures (tokens,
V, K, each variant's parameters and forward FLOPs per token, the table's share, bits per byte, and each gap to
the reference with its 95% interval over seeds); OUT/results.md the table; OUT/gaps.png the gaps along the axis.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .compare import (COMPARE_KEYS, DEFAULT_VARIANTS, NAME_CHARACTERS, T_95, Variant, checked_settings,
                      failure_report, heldout_label, machine, parse_list, parse_variants, print_written,
                      read_command_config, run_in_processes, run_one, save_png, source_commit, summarise,
                      unigram_baseline)
from .errors import TableFreeError, WriteError
from .files import claim_output_dir, output_lock, write_atomic, write_json

STUDY_KEYS = (*COMPARE_KEYS, "points", "axis", "title")
AXES = {"tokens": "training tokens per run", "table_share": "the learned table's share of the parameters",
        "point": "point"}
PUBLISHED = ("results.md", "results.json", "gaps.png")


@dataclass(frozen=True)
class Point:
    """One comparison of the study: its training settings (the base with the point's settings on top) and rows."""

    name: str
    base: object  # TrainConfig
    variants: tuple[Variant, ...]


def parse_points(items, values: dict, overrides: dict, variants: list[Variant], where: str) -> list[Point]:
    """The study's points: each a mapping with a name, its own settings and optionally its own variants."""
    from .train import train_config_from

    if not isinstance(items, list) or not items:
        raise TableFreeError(f"points in {where} must be a non-empty list of mappings, each with a name and the "
                             f"settings of that point (e.g. {{name: 65k, max_steps: 256}})")
    points, names = [], set()
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise TableFreeError(f"point {index} in {where} must be a mapping with a name, got {item!r}")
        name = item["name"]
        if not NAME_CHARACTERS.fullmatch(name):
            raise TableFreeError(f"point {name!r} in {where}: write its name with letters, digits and _ . = + - only "
                                 f"(it names the point's directory)")
        if name in names:
            raise TableFreeError(f"point {name!r} is listed twice in {where}")
        names.add(name)
        settings = {k: v for k, v in item.items() if k not in ("name", "variants")}
        model = settings.pop("model", None) or {}
        if not isinstance(model, dict):
            raise TableFreeError(f"point {name!r} in {where}: model must be a mapping of model fields, got {model!r}")
        merged = {**values, **settings, "model": {**(values.get("model") or {}), **model}}
        base = train_config_from(merged, overrides, where=f"point {name!r} of {where}")
        own = parse_labelled_variants(item["variants"], f"point {name!r} of {where}") if "variants" in item else variants
        points.append(Point(name, base, tuple(own)))
    return points


def parse_labelled_variants(items, where: str) -> list[Variant]:
    """Variants as compare takes them, or {name: LABEL, variant: VARIANT+KEY=VALUE...}: a row named LABEL at every
    point where it appears (the table-free model with the table's parameters in its body, whatever size that takes)."""
    if not isinstance(items, list) or not items:
        raise TableFreeError(f"variants of {where} must be a non-empty list, got {items!r}")
    variants = []
    for item in items:
        if isinstance(item, dict):
            if set(item) != {"name", "variant"} or not all(isinstance(v, str) for v in item.values()):
                raise TableFreeError(f"a variant of {where} written as a mapping takes name and variant, both text, "
                                     f"got {item!r}")
            if not NAME_CHARACTERS.fullmatch(item["name"]):
                raise TableFreeError(f"variant name {item['name']!r} of {where}: letters, digits and _ . = + - only")
            variants.append(replace(parse_variants([item["variant"]])[0], name=item["name"]))
        else:
            variants.append(parse_variants([item])[0])
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TableFreeError(f"variant {repeated[0]!r} is listed twice in {where}")
    return variants


def point_facts(point: Point) -> dict:
    """What a point is: tokens per run, V and K, and each variant's parameters and forward FLOPs per token."""
    from .codes import code_bits_for
    from .metrics import training_flops_per_token
    from .presets import parameter_count
    from .tokenizer import load_tokenizer
    from .train import model_config

    tokenizer = load_tokenizer(point.base.tokenizer or Path(point.base.data) / "tokenizer")
    variants = {}
    for v in point.variants:
        cfg = v.config(point.base, 0, Path("."))
        config = model_config(cfg, tokenizer)
        params = parameter_count(model_class(config), config)
        table = config.vocab_size * config.hidden_size if v.variant == "learned" else 0
        variants[v.name] = {"params": params, "input_table_params": table,
                            "layers": config.num_hidden_layers, "width": config.hidden_size,
                            "mlp": config.intermediate_size,
                            # a third of training's 6 x matmul parameters + attention: one forward pass
                            "forward_flops_per_token": training_flops_per_token(config, cfg.seq_len) / 3}
        vocab = config.vocab_size
    learned = variants.get("learned")
    return {"tokens": point.base.steps() * point.base.batch_size * point.base.seq_len, "steps": point.base.steps(),
            "vocab_size": vocab, "code_bits": code_bits_for(vocab),
            "table_share": learned["input_table_params"] / learned["params"] if learned else None,
            "variants": variants}


def model_class(config):
    """The class `presets.build_model` builds for a config."""
    from transformers import GPTNeoXForCausalLM

    from .configuration_tablefree import TableFreeConfig
    from .modeling_tablefree import TableFreeForCausalLM

    return TableFreeForCausalLM if isinstance(config, TableFreeConfig) else GPTNeoXForCausalLM


def paired_difference(values: list[float], reference: list[float]) -> dict:
    """value - reference, seed by seed: the mean and the half-width of its 95% t-interval."""
    diffs = [v - r for v, r in zip(values, reference)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci95": None, "within_noise": None}
    df = len(diffs) - 1
    t = T_95[max(k for k in T_95 if k <= df)] if df <= 30 else 1.960
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci95": half, "within_noise": abs(mean) <= half}


def bits_gaps(runs: list[dict], names: list[str], reference: str, labels: list[str]) -> dict:
    """Per variant: its bits per byte minus the reference's, paired by seed, on validation and each held-out text."""
    by = {(r["name"], r["seed"]): r for r in runs}
    gaps = {}
    for name in names:
        seeds = sorted(s for n, s in by if n == name and (reference, s) in by)
        if not seeds:
            continue
        mine = [by[(name, s)] for s in seeds]
        ref = [by[(reference, s)] for s in seeds]
        gaps[name] = {"val": paired_difference([r["val_bits_per_byte"] for r in mine],
                                               [r["val_bits_per_byte"] for r in ref])}
        for label in labels:
            gaps[name][label] = paired_difference([r["heldout"][label]["bits_per_byte"] for r in mine],
                                                  [r["heldout"][label]["bits_per_byte"] for r in ref])
    return gaps


def study(points: list[Point], seeds: list[int], out: str | Path, reference: str = "learned", heldout=(),
          jobs: int = 1, force: bool = False, axis: str = "point", title: str | None = None) -> dict:
    """Train (or resume) every run of every point, then summarise each point and the trend; returns results.json."""
    from .compare import check_jobs
    from .data import TokenShards
    from .train import check_given, make_config, model_config

    out = Path(out)
    labels = [heldout_label(spec) for spec in heldout]
    if len(set(labels)) < len(labels):
        raise TableFreeError(f"two held-out texts share the name {max(labels, key=labels.count)!r}")
    heldout = dict(zip(labels, heldout))
    configs = {}
    for point in points:
        names = [v.name for v in point.variants]
        if reference not in names:
            raise TableFreeError(f"point {point.name!r} does not compare the reference {reference!r} "
                                 f"(its variants: {', '.join(names)})")
        if heldout and not point.base.save_model:
            raise TableFreeError("scoring held-out text needs the trained models: set save_model=true")
        check_given(point.base)
        TokenShards(point.base.data, "train")
        for v in point.variants:
            for seed in seeds:
                cfg = v.config(point.base, seed, out / point.name)
                model_config(make_config(asdict(cfg), where=f"point {point.name!r}"))  # checked before hours of work
                configs[(point.name, v.name, seed)] = cfg
    if jobs > 1:
        check_jobs(configs)
    facts = {point.name: point_facts(point) for point in points}
    # Longest first: under --jobs the last runs to finish are short ones, and no core waits long for them.
    cost = {key: facts[key[0]]["tokens"] * facts[key[0]]["variants"][key[1]]["forward_flops_per_token"]
            for key in configs}
    order = sorted(configs, key=lambda key: -cost[key])
    with output_lock(out):
        claim_output_dir(out, "study", resumable=True, force=force, writes=(*PUBLISHED, *(p.name for p in points)))
        if jobs > 1:
            done, failed = run_in_processes({key: configs[key] for key in order}, heldout, jobs)
        else:
            done, failed = {}, {}
            for key in order:
                print(f"== {'/'.join(map(str, key[:2]))}-seed{key[2]} ==", flush=True)
                try:
                    done[key] = run_one(configs[key], heldout)
                except TableFreeError as exc:
                    failed[key] = exc
        if failed:
            environment = all(isinstance(exc, WriteError) for exc in failed.values())
            report = failure_report({(f"{p}/{n}", s): exc for (p, n, s), exc in failed.items()}, len(configs))
            raise (WriteError if environment else TableFreeError)(report)
        results = {"title": title, "axis": axis, "reference": reference, "seeds": seeds, "heldout": heldout,
                   "points": []}
        for point in points:
            names = [v.name for v in point.variants]
            runs = [{"name": name, **done[(point.name, name, seed)]} for name in names for seed in seeds]
            summary = summarise(runs, names, [reference])
            results["points"].append({
                "name": point.name, **facts[point.name],
                "config": {k: v for k, v in vars(point.base).items() if k not in ("out", "variant", "seed")},
                "variants_compared": [vars(v) for v in point.variants],
                "baselines": {"unigram": unigram_baseline(point.base, heldout)},
                "summary": summary, "bits_gaps": bits_gaps(runs, names, reference, labels), "runs": runs})
        write_json(out / "results.json", results)
        write_atomic(out / "results.md", markdown(results).encode("utf-8"))
        plot_trend(out / "gaps.png", results)
        return results


def axis_value(result: dict, point: dict):
    if result["axis"] == "tokens":
        return point["tokens"]
    if result["axis"] == "table_share":
        return point["table_share"]
    return point["name"]


def _interval(gap: dict, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    text = f"{scale * gap['mean']:+.{digits}f}{unit}"
    if gap["ci95"] is None:
        return text + " (one seed)"
    verdict = "within noise" if gap["within_noise"] else "beyond noise"
    return f"{text} ± {scale * gap['ci95']:.{digits}f}{unit}, {verdict}"


def markdown(result: dict) -> str:
    """The study's table: one row per point and variant, its size, scores and gaps to the reference."""
    reference, labels = result["reference"], list(result["heldout"])
    seeds = result["seeds"]
    lines = [f"# {result['title'] or 'Study'}", "",
             f"{len(result['points'])} points; at each, every variant trained with model seeds "
             f"{', '.join(map(str, seeds))} on identical batches (data seed shared). Gaps are to `{reference}`, "
             f"paired by seed, as mean ± the half-width of the 95% t-interval over the seeds; bits per byte "
             f"(lower is better), so a positive gap means behind {reference}.", "",
             "| point | tokens per run | V | K | table share | variant | parameters (vs " + reference + ") | "
             "forward FLOPs per token | val bits/byte | " + "".join(f"{l} bits/byte | " for l in labels)
             + f"val gap to {reference}, bits/byte (95% CI) | "
             + "".join(f"{l} gap, bits/byte (95% CI) | " for l in labels) + "val PPL gap (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(labels) + "---|" + "---|" * len(labels) + "---|"]
    for point in result["points"]:
        ref_params = point["variants"].get(reference, {}).get("params")
        share = f"{point['table_share']:.1%}" if point["table_share"] is not None else "–"
        for name, s in point["summary"].items():
            facts = point["variants"][name]
            relative = f" ({facts['params'] / ref_params - 1:+.1%})" if ref_params and name != reference else ""
            cells = [point["name"], f"{point['tokens']:,}", f"{point['vocab_size']:,}", str(point["code_bits"]), share,
                     name, f"{facts['params']:,}{relative}", f"{facts['forward_flops_per_token'] / 1e6:,.2f} M",
                     f"{s['bits_per_byte_mean']:.4f} ± {s['bits_per_byte_std']:.4f}"]
            cells += [f"{s['heldout'][l]['bits_per_byte_mean']:.4f} ± {s['heldout'][l]['bits_per_byte_std']:.4f}"
                      for l in labels]
            if name == reference:
                cells += ["reference"] * (1 + len(labels)) + ["reference"]
            else:
                gaps = point["bits_gaps"][name]
                cells += [_interval(gaps["val"])] + [_interval(gaps[l]) for l in labels]
                cells.append(_interval(s["gaps"][reference], 100, 1, "%"))
            lines.append("| " + " | ".join(cells) + " |")
        unigram = point["baselines"]["unigram"]
        cells = [point["name"], "", "", "", "", "unigram (no model)", "–", "–", f"{unigram['val_bits_per_byte']:.4f}"]
        cells += [f"{unigram['heldout'][l]['bits_per_byte']:.4f}" for l in labels]
        lines.append("| " + " | ".join(cells + ["–"] * (2 + len(labels))) + " |")
    lines += ["", "Table share: the learned table's parameters over the learned model's. Forward FLOPs per token: "
              "2 x the matmul parameters (the output head included, the input lookup not) + the attention's "
              "2 x layers x context x width. Unigram: each token's training frequency as the prediction."]
    return "\n".join(lines) + "\n"


def plot_trend(path: Path, result: dict) -> Path:
    """The gap to the reference along the study's axis, one line per variant, one panel per text, with 95% bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference, texts = result["reference"], ["val", *result["heldout"]]
    names = []
    for point in result["points"]:
        names += [n for n in point["bits_gaps"] if n != reference and n not in names]
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    numeric = result["axis"] in ("tokens", "table_share")
    for ax, text in zip(axes[0], texts):
        for index, name in enumerate(names):
            xs, ys, errs = [], [], []
            for position, point in enumerate(result["points"]):
                gap = point["bits_gaps"].get(name, {}).get(text)
                if gap is None:
                    continue
                x = axis_value(result, point)
                xs.append(100 * x if result["axis"] == "table_share" else x if numeric else position)
                ys.append(gap["mean"])
                errs.append(gap["ci95"] or 0)
            shift = 1 + 0.03 * (index - (len(names) - 1) / 2)  # side by side, not on top of each other
            xs = [x * shift for x in xs] if result["axis"] == "tokens" else [x + 0.08 * (index - (len(names) - 1) / 2)
                                                                             for x in xs]
            ax.errorbar(xs, ys, yerr=errs, fmt="o-", color=colours[index % len(colours)], capsize=3, label=name,
                        linewidth=1.2, markersize=4)
        ax.axhline(0, color="black", linewidth=0.8)
        if result["axis"] == "tokens":
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(result["points"])), [p["name"] for p in result["points"]], rotation=20)
        ax.set_xlabel(AXES.get(result["axis"], result["axis"]) + (" (%)" if result["axis"] == "table_share" else ""))
        ax.set_ylabel(f"{'validation' if text == 'val' else text} bits/byte minus {reference}'s")
        ax.set_title(f"{'validation' if text == 'val' else text}: above 0 = behind {reference}", fontsize=9)
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.suptitle(f"{result['title'] or 'study'}: mean over {len(result['seeds'])} seeds, bars = 95% interval of "
                 f"the paired gap", fontsize=10)
    return save_png(fig, path)


def publish(out: Path, dest: str | Path, command: str, force: bool = False) -> Path:
    """The finished study in OUT as files to commit: the table, the json and the plot, with the command, the commit
    and the machine. DEST receives only PUBLISHED; rerunning the command republishes over its own files."""
    from .files import read_json

    with output_lock(dest, inputs=[out]):
        dest = claim_output_dir(dest, "results", resumable=True, force=force, inputs=[out], writes=PUBLISHED)
        results = read_json(out / "results.json", "the study's results")
        runs = [r for p in results["points"] for r in p["runs"]]
        hours = sum(r["tokens"] / r["tokens_per_s"] for r in runs if r.get("tokens_per_s")) / 3600
        provenance = {"command": command, "commit": source_commit(), "machine": machine(),
                      "training_hours": round(hours, 3)}
        write_json(dest / "results.json", {"provenance": provenance, **results})
        header = (f"Generated by `{command}` at commit `{provenance['commit']}` on {provenance['machine']}; the "
                  f"{len(runs)} runs' training time adds up to {hours * 60:.0f} minutes (runs trained at once under "
                  f"--jobs overlap in wall-clock time).\n\n")
        write_atomic(dest / "results.md", (header + (out / "results.md").read_text(encoding="utf-8")).encode("utf-8"))
        plot_trend(dest / "gaps.png", results)
        print(f"published {', '.join(str(dest / name) for name in PUBLISHED)}")
        return dest


def study_command(args) -> int:
    values, settings, overrides = read_command_config(args, STUDY_KEYS)
    variants = parse_variants(settings.get("variants", DEFAULT_VARIANTS))
    points = parse_points(settings.get("points"), values, overrides, variants, str(args.config))
    if args.points:
        wanted = parse_list(args.points)
        unknown = [n for n in wanted if n not in {p.name for p in points}]
        if unknown:
            raise TableFreeError(f"--points: no point {unknown[0]!r} in {args.config} "
                                 f"(its points: {', '.join(p.name for p in points)})")
        points = [p for p in points if p.name in wanted]
    seeds, heldout = checked_settings(args, settings)
    reference = settings.get("reference", "learned")
    reference = reference[0] if isinstance(reference, list) and len(reference) == 1 else reference
    if not isinstance(reference, str):
        raise TableFreeError(f"reference in {args.config} must be one variant's name, got {reference!r}")
    axis = settings.get("axis", "point")
    if axis not in AXES:
        raise TableFreeError(f"axis in {args.config} must be one of {', '.join(AXES)}, got {axis!r}")
    out = Path(args.out or values.get("out") or "runs/study")
    study(points, seeds, out, reference=reference, heldout=heldout, jobs=args.jobs, force=args.force, axis=axis,
          title=settings.get("title"))
    if args.publish:
        publish(out, args.publish, args.command_line, force=args.force)
    print_written(out, "gaps.png")
    return 0


def add_cli(subparsers) -> None:
    from .runtime import add_runtime_flags

    cmd = subparsers.add_parser("study")
    cmd.add_argument("--config", required=True,
                     help="YAML compare config (training settings, variants, seeds, reference, heldout) with `points`: "
                          "a list of {name: ..., SETTING: VALUE, model: {...}, variants: [...]}, and `axis` "
                          f"({', '.join(AXES)}) and `title` for the plot")
    cmd.add_argument("--points", default=None, help="comma-separated point names: run and summarise these only")
    cmd.add_argument("--seeds", default=None, help="model seeds, crossed with every variant (default: the config's)")
    cmd.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="train N runs at once on the CPU, each in its own process with cores/N threads")
    cmd.add_argument("--out", help="output directory (default: the config's out)")
    cmd.add_argument("--publish", metavar="DIR", help="then copy results.md, results.json (with the command, commit "
                                                      "and machine) and gaps.png to DIR, to commit")
    cmd.add_argument("--force", action="store_true",
                     help="write into a non-empty OUT that is not a study's; files tablefree did not write are never touched")
    add_runtime_flags(cmd)
    cmd.set_defaults(device=None, dtype=None)
    cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training settings for every point")
    cmd.set_defaults(run=study_command)
