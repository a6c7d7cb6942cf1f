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
