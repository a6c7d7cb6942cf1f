"""Commands never destroy work: output-directory ownership, --force, atomic strict-JSON writes (docs/safety.md)."""

import json
import math
import os
import subprocess
import sys

import pytest
from training_data import prepared_data, topic_documents, train_overrides, write_jsonl  # noqa: F401  (fixture)

from tablefree.errors import TableFreeError
from tablefree.files import (
    append_text,
    claim_output_dir,
    clean_stale_temporaries,
    install_directory,
    lock_path,
    output_lock,
    read_json,
    write_json,
)

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


# One command at a time per output directory (a flock that dies with its process), and no write through a symlink.

HOLD_LOCK = "import sys\nfrom tablefree.files import output_lock\nwith output_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()"


def _hold_lock(out):
    """Another process holding `out`'s lock, as a running command does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def _writing_commands(out, model, corpus, data, config):
    """Every command that writes a directory, each writing `out` (cheap settings)."""
    return {
        "new": ["new", "tiny-affine", out],
        "export": ["export", model, out],
        "export-gguf": ["export", model, out, "--format", "gguf"],
        "tokenizer": ["tokenizer", "build", "--out", out, "--corpus", corpus],
        "data": ["data", "prepare", "--source", corpus, "--out", out, "--tokenizer-chars", "20000", "--val-fraction", "0.2",
                 "--quiet"],
        "train": ["train", "--config", config, f"out={out}"],
        "compare": ["compare", "--config", config, "--out", out, "--variants", "affine", "--seeds", "0"],
        "quickstart": ["quickstart", "--out", out, "--quiet"],
    }


@pytest.fixture
def command_inputs(tmp_path, saved_tiny_model, prepared_data):
    import yaml

    corpus = write_jsonl(tmp_path / "corpus.jsonl", topic_documents(40))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_overrides(prepared_data, tmp_path / "unused", max_steps=1, eval_tokens=64)))
    return dict(model=saved_tiny_model[0], corpus=corpus, data=prepared_data, config=config)


def _main(capsys, args) -> tuple[int, str]:
    from tablefree.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_second_command_on_a_directory_in_use_is_refused_naming_the_first(tmp_path, command_inputs, capsys):
    out = tmp_path / "runs" / "out"
    holder = _hold_lock(out)
    try:
        for name, args in _writing_commands(out, **command_inputs).items():
            code, err = _main(capsys, args)
            assert code == 2 and err.count("\n") == 1, (name, err)
            assert f"error: the output directory {out} is in use by another tablefree command (pid {holder.pid}: " in err
            assert "output_lock" in err, err  # the holder's command line
            assert not out.exists(), name  # the lock covers creating the directory
    finally:
        holder.kill()
        holder.wait()
    # A kill -9 leaves the lock file but not the lock: the next command takes the directory, then removes the file.
    assert lock_path(out).exists()
    assert _main(capsys, ["new", "tiny-affine", out]) == (0, "")
    assert not lock_path(out).exists() and (out / "config.json").is_file()


def test_a_killed_command_s_lock_file_never_makes_a_directory_refused(tmp_path, capsys):
    parent = tmp_path / "parent"
    holder = _hold_lock(parent / "child")
    holder.kill()
    holder.wait()
    assert [p.name for p in parent.iterdir()] == [".child.tablefree-lock"]
    code, err = _main(capsys, ["new", "tiny-affine", parent])
    assert code == 0, err
    assert not lock_path(parent / "child").exists()


def test_a_lock_is_given_back_and_taken_again_and_a_live_one_is_kept(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        assert lock_path(out).is_file()
        clean_stale_temporaries(tmp_path)  # a held lock is not stale
        assert lock_path(out).is_file()
        with pytest.raises(TableFreeError, match=f"in use by another tablefree command \\(pid {os.getpid()}: "):
            with output_lock(tmp_path / "." / "out"):  # another name of the same directory
                pass
    assert not lock_path(out).exists()
    with output_lock(out):
        pass
    with pytest.raises(TableFreeError, match="the output .* lies inside the input"):
        with output_lock(tmp_path / "data" / "out", inputs=[tmp_path / "data"]):
            pass
    assert not (tmp_path / "data").exists()  # not even the lock is written inside an input


@pytest.fixture
def elsewhere(tmp_path):
    """A directory outside every output, whose content a symlink must never let a command change."""
    place = tmp_path / "elsewhere"
    place.mkdir()
    (place / "precious.txt").write_text("precious")
    return place


def _untouched(place):
    assert _listing(place) == [("precious.txt", b"precious")]


@pytest.mark.parametrize("kind", ["file", "subdirectory", "marker", "dangling"])
def test_the_claim_refuses_a_symlink_where_a_command_writes_whatever_the_flags(tmp_path, elsewhere, kind):
    out = tmp_path / "run"
    claim_output_dir(out, "train", resumable=True)
    name = {"file": "result.json", "subdirectory": "model", "marker": ".tablefree-output.json",
            "dangling": "metrics.jsonl"}[kind]
    target = {"file": elsewhere / "precious.txt", "subdirectory": elsewhere, "marker": elsewhere / "precious.txt",
              "dangling": elsewhere / "created.txt"}[kind]
    if kind == "marker":
        (out / name).unlink()
    (out / name).symlink_to(target)
    for force in (False, True):
        with pytest.raises(TableFreeError, match=f"{out / name} is a symbolic link; tablefree never writes through one"):
            claim_output_dir(out, "train", resumable=True, force=force, writes=["result.json", "model", "metrics.jsonl"])
    _untouched(elsewhere)


def test_writers_refuse_a_symlink(tmp_path, elsewhere):
    link = tmp_path / "link.json"
    link.symlink_to(elsewhere / "precious.txt")
    with pytest.raises(TableFreeError, match="is a symbolic link"):
        write_json(link, {"a": 1})
    dangling = tmp_path / "metrics.jsonl"
    dangling.symlink_to(elsewhere / "created.jsonl")
    with pytest.raises(TableFreeError, match="is a symbolic link"):
        append_text(dangling, "{}\n")
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "config.json").write_text("{}")
    model = tmp_path / "model"
    model.symlink_to(elsewhere)
    with pytest.raises(TableFreeError, match="model is a symbolic link"):
        install_directory(stage, model, "model")
    model.unlink()
    model.mkdir()
    (model / "config.json").symlink_to(elsewhere / "precious.txt")
    with pytest.raises(TableFreeError, match="config.json is a symbolic link"):
        install_directory(stage, model, "model")
    # A symlink named like a stale temporary is removed itself; what it points to stays.
    (tmp_path / ".model.tablefree-tmp-999999999-0a1b2c3d").symlink_to(elsewhere)
    clean_stale_temporaries(tmp_path)
    assert not (tmp_path / ".model.tablefree-tmp-999999999-0a1b2c3d").is_symlink()
    _untouched(elsewhere)


def test_commands_never_write_through_a_symlink_in_their_output(tmp_path, elsewhere, command_inputs, capsys):
    # A finished output with --force (its files named by the marker), and resumable outputs resumed.
    cases = [("new", "config.json", ["--force"]), ("export", "model.safetensors", ["--force"]),
             ("export-gguf", "model.gguf", ["--force"]), ("tokenizer", "tokenizer.json", ["--force"]),
             ("data", "tokenizer", []), ("train", "model", []), ("compare", "affine-seed0", []),
             ("quickstart", "runs/affine", [])]
    assert {name for name, _, _ in cases} == set(_writing_commands(tmp_path, **command_inputs))
    for name, inside, flags in cases:
        out = tmp_path / name
        args = _writing_commands(out, **command_inputs)[name]
        kind = {"new": "model", "export": "model", "export-gguf": "gguf", "train": "train"}.get(name, name)
        claim_output_dir(out, kind, resumable=True)
        link = out / inside
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(elsewhere)
        code, err = _main(capsys, [*args, *flags])
        assert code == 2, (name, err)
        assert err == (f"error: {link} is a symbolic link; tablefree never writes through one (it could overwrite what "
                       f"it points to): move it away, or choose another output directory\n"), name
    _untouched(elsewhere)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 256 KiB (a tmpfs: mounting one needs root, so the test is skipped without it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tablefree-test", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _grow(disk):
    subprocess.run(["mount", "-o", "remount,size=512m", str(disk)], check=True)


def _leftovers(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if "tablefree-tmp" in p.name
                  or p.name.endswith(".tablefree-lock"))


@pytest.mark.parametrize("name", ["new", "export", "export-gguf", "tokenizer", "data", "train", "compare", "quickstart"])
def test_a_full_disk_is_one_line_leaves_nothing_behind_and_the_next_run_works(small_disk, command_inputs, capsys, name):
    out = small_disk / "out"
    args = _writing_commands(out, **command_inputs)[name]
    code, err = _main(capsys, args)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "could not write " in err and ": the disk is full" in err, err
    assert _leftovers(small_disk) == []
    if name in ("new", "export", "export-gguf", "tokenizer"):  # a finished output appears whole or not at all
        assert list(small_disk.iterdir()) == []
    if name == "quickstart":
        return  # its next run trains for minutes; `data` and `train` are its parts
    _grow(small_disk)
    code, err = _main(capsys, args)
    assert code == 0, err
    assert _leftovers(small_disk) == []
