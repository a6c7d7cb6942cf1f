"""Commands never destroy work: output-directory ownership, --force, atomic strict-JSON writes (docs/safety.md)."""

import json
import math
import subprocess
import sys

import pytest

from tablefree.errors import TableFreeError
from tablefree.files import claim_output_dir, read_json, write_json

CLI = [sys.executable, "-m", "tablefree.cli"]


def _run(*args, cwd=None):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _listing(directory):
    return sorted((p.relative_to(directory).as_posix(), p.read_bytes()) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("command", ["new", "export"])
def test_commands_refuse_a_non_empty_directory_and_force_keeps_foreign_files(saved_tiny_model, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an unrelated file")
    args = ["new", "tiny-affine", out] if command == "new" else ["export", saved_tiny_model[0], out]
    refused = _run(*args)
    assert refused.returncode == 2
    assert f"the output directory {out} exists and is not empty" in refused.stderr and "--force" in refused.stderr
    assert _listing(out) == [("notes.txt", b"an unrelated file")]
    forced = _run(*args, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "notes.txt").read_text() == "an unrelated file" and (out / "config.json").is_file()
    again = _run(*args)  # a finished model is not resumable output: overwriting it needs --force too
    assert again.returncode == 2 and "holds an earlier tablefree model output" in again.stderr


def test_force_never_overwrites_a_file_of_the_same_name(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = _run("new", "tiny-affine", out, "--force")
    assert result.returncode == 2 and "config.json already exists and was not written by tablefree" in result.stderr
    assert _listing(out) == [("config.json", b"{}")]


def test_output_that_is_a_file_or_the_current_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _run("new", "tiny-affine", tmp_path / "file")
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("keep")
    result = _run("new", "tiny-affine", ".", cwd=tmp_path / "work")
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert _listing(tmp_path / "work") == [("keep.txt", b"keep")]


def test_resumable_outputs_take_their_own_directory_but_not_another_kind(tmp_path):
    out = tmp_path / "run"
    claim_output_dir(out, "train", resumable=True)
    (out / "metrics.jsonl").write_text("")
    assert claim_output_dir(out, "train", resumable=True) == out
    with pytest.raises(TableFreeError, match="holds an earlier tablefree train output"):
        claim_output_dir(out, "data", resumable=True)


def test_json_is_strict_and_damage_is_named(tmp_path):
    write_json(tmp_path / "r.json", {"loss": math.nan, "ppl": [math.inf, 1.0]})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) == {"loss": None, "ppl": [None, 1.0]}
    (tmp_path / "torn.json").write_text('{"step": 3, "lo')
    with pytest.raises(TableFreeError, match=r"torn.json cannot be read .* damaged"):
        read_json(tmp_path / "torn.json", "manifest")
