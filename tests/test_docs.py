"""The documentation that ships: every link resolves, and the files saved inside model directories stand alone."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
SHIPPED_IN_MODELS = ["codes.py", "configuration_tablefree.py", "modeling_tablefree.py"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("name", SHIPPED_IN_MODELS)
def test_files_saved_with_models_cite_nothing_outside_themselves(name):
    text = (ROOT / "tablefree" / name).read_text()
    assert not re.search(r"DESIGN\.md|docs/|README|\.\./shared", text), name


def test_readme_quotes_the_published_study():
    import json

    results = json.loads((ROOT / "docs" / "results" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for name in ("learned", "minimal", "affine"):
        s = results["summary"][name]
        row = (f"| {name} | {s['val_ppl_mean']:.1f} ± {s['val_ppl_std']:.1f} | {s['bits_per_byte_mean']:.3f} | "
               f"{s['heldout']['python-notes']['bits_per_byte_mean']:.3f} | {s['trainable_input_params']:,} |")
        assert row in readme, row
    unigram = results["baselines"]["unigram"]
    assert f"| unigram (no model) | {unigram['val_ppl']:,.1f} | {unigram['val_bits_per_byte']:.3f} |" in readme
    assert results["provenance"]["command"] in readme


def test_readme_quotes_the_published_trend_studies():
    """The README's three lines on the trends are the published studies' figures (docs/results-*/results.json)."""
    import json

    from tablefree.study import paired_difference

    def gap(value: dict) -> str:
        return f"{value['mean']:+.3f} ± {value['ci95']:.3f}"

    readme = (ROOT / "README.md").read_text()
    tokens = json.loads((ROOT / "docs" / "results-tokens" / "results.json").read_text())
    share = json.loads((ROOT / "docs" / "results-share" / "results.json").read_text())
    at = {point["tokens"]: point["bits_gaps"]["affine"]["val"] for point in tokens["points"]}
    assert min(at) == 32_768 and max(at) == 524_288  # the span the README names (16x)
    for quoted in (f"from {gap(at[32_768])}", f"{gap(at[262_144])} at 256K", f"{gap(at[524_288])} at 512K"):
        assert quoted in readme, quoted
    shares = {f"{100 * point['table_share']:.1f}".removesuffix(".0"): point for point in share["points"]}
    assert sorted(shares) == ["12.5", "19.9", "28.5", "42"]
    for label in ("42", "19.9", "12.5"):
        quoted = f"{gap(shares[label]['bits_gaps']['affine']['val'])} at {label}%"
        assert quoted in readme, quoted
    # affine-equal minus affine, paired by seed, at each share: the README quotes the smallest and largest.
    differences = []
    for point in share["points"]:
        runs = {(run["name"], run["seed"]): run["val_bits_per_byte"] for run in point["runs"]}
        seeds = sorted(seed for name, seed in runs if name == "affine")
        differences.append(paired_difference([runs["affine-equal", s] for s in seeds], [runs["affine", s] for s in seeds]))
        params = {name: facts["params"] for name, facts in point["variants"].items()}
        assert abs(params["affine-equal"] / params["learned"] - 1) <= 0.004  # "within 0.4% of learned's total"
    low, high = min(differences, key=lambda d: d["mean"]), max(differences, key=lambda d: d["mean"])
    assert f"({gap(low)} to {gap(high)} bits per byte against it)" in readme
    for study in (tokens, share):
        assert study["provenance"]["command"].split(" --publish")[0] in (ROOT / "docs" / "study.md").read_text()
