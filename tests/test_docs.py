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
