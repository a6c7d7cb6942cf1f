import json
import math
import re
from pathlib import Path

import pytest

from training_data import prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.checkpoint import CHECKPOINT
from tablefree.compare import compare, paired_gap, parse_variants, summarise
from tablefree.errors import TableFreeError
from tablefree.train import make_config


def test_toy_matched_comparison_writes_table_json_and_plot(prepared_data, tmp_path, capsys):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=3, checkpoint_every=2))
    out = tmp_path / "cmp"
    results = compare(base, ["learned", "affine"], [0, 1], out)
    assert (out / "results.json").is_file() and (out / "loss_curves.png").stat().st_size > 5000
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| learned |" in table and "| affine |" in table and " ± " in table
    assert "| +0.0% ± 0.0% | reference |" in table.split("| learned |")[1].splitlines()[0]  # its own reference
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["learned"]["trainable_input_params"] == 65536 * 32 and summary["affine"]["trainable_input_params"] == 0
    assert summary["learned"]["gaps"]["learned"]["mean"] == 0 and list(summary["affine"]["gaps"]) == ["learned"]
    # The unigram level the models are read against: better than uniform over the 65,536 ids, scored on the same
    # validation tokens as the runs.
    unigram = json.loads((out / "results.json").read_text())["baselines"]["unigram"]
    assert 0 < unigram["val_loss"] < math.log(65536) and unigram["val_ppl"] == pytest.approx(math.exp(unigram["val_loss"]))
    assert f"| unigram (no model) | {unigram['val_ppl']:.3f} | {unigram['val_bits_per_byte']:.4f} | – |" in table
    # Same data seed: both variants saw identical batches; different model seeds gave different models.
    runs = results["runs"]
    assert len(runs) == 4 and runs[0]["val_loss"] != runs[1]["val_loss"]
    # Each run names its size and variant as given; no preset name that could contradict the variant.
    assert [(r["size"], r["variant"], r["seed"]) for r in runs] == [
        ("tiny", "learned", 0), ("tiny", "learned", 1), ("tiny", "affine", 0), ("tiny", "affine", 1)]
    assert not any("preset" in r for r in runs) and "| learned |" in table
    # An interrupted or repeated comparison does not retrain finished runs.
    stamp = (out / "affine-seed1" / CHECKPOINT).stat().st_mtime_ns
    again = compare(base, ["learned", "affine"], [0, 1], out)
    assert (out / "affine-seed1" / CHECKPOINT).stat().st_mtime_ns == stamp
    assert again["summary"] == results["summary"]


def test_summary_arithmetic():
    runs = [
        {"variant": "learned", "seed": 0, "val_ppl": 2.4, "val_bits_per_byte": 1.0, "trainable_input_params": 10},
        {"variant": "learned", "seed": 1, "val_ppl": 2.6, "val_bits_per_byte": 1.2, "trainable_input_params": 10},
        {"variant": "affine", "seed": 1, "val_ppl": 2.6 * 1.1, "val_bits_per_byte": 1.25, "trainable_input_params": 0},
        {"variant": "affine", "seed": 0, "val_ppl": 2.4 * 1.3, "val_bits_per_byte": 1.05, "trainable_input_params": 0},
    ]
    summary = summarise(runs, ["learned", "affine"], ["learned", "affine"])
    assert abs(summary["learned"]["val_ppl_mean"] - 2.5) < 1e-12
    assert abs(summary["learned"]["seed_spread"] - 0.08) < 1e-12
    # Paired by seed (the runs arrive in any order): gaps +30% and +10%, mean 20%, sd 0.1414, t(1) = 12.706.
    affine = summary["affine"]["gaps"]["learned"]
    assert summary["affine"]["seeds"] == [0, 1] and abs(affine["mean"] - 0.2) < 1e-12
    assert abs(affine["ci95"] - 12.706 * 0.1 * 2**0.5 / 2**0.5) < 1e-9 and affine["within_noise"] is True
    # A second reference: its own gaps, the first one's unchanged.
    assert summary["affine"]["gaps"]["affine"]["mean"] == 0 and summary["learned"]["gaps"]["affine"]["mean"] < 0


def test_paired_gap_says_when_a_gap_is_beyond_noise():
    same_shift = paired_gap([1.10, 1.21, 0.99], [1.0, 1.1, 0.9])  # +10% on every seed: no spread, beyond noise
    assert abs(same_shift["mean"] - 0.1) < 1e-12 and same_shift["ci95"] < 1e-12 and same_shift["within_noise"] is False
    noisy = paired_gap([1.2, 0.9, 1.05], [1.0, 1.0, 1.0])
    assert noisy["within_noise"] is True and abs(noisy["ci95"] - 4.303 * 0.15 / 3**0.5) < 1e-9
    one = paired_gap([1.2], [1.0])
    assert abs(one["mean"] - 0.2) < 1e-12 and one["ci95"] is None and one["within_noise"] is None


def test_variants_with_their_own_settings_are_rows_of_their_own(prepared_data, tmp_path):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=2))
    out = tmp_path / "cmp"
    names = ["affine", "affine+code_values=bipolar", "hashed+code_bits=20+lr=0.002"]
    results = compare(base, names, [0], out, reference="affine")
    assert list(results["summary"]) == names and results["references"] == ["affine"]
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["affine+code_values=bipolar"]["variant"] == "affine" and runs["hashed+code_bits=20+lr=0.002"]["variant"] == "hashed"
    config = json.loads((out / "affine+code_values=bipolar-seed0" / "model" / "config.json").read_text())
    assert config["code_values"] == "bipolar" and config["code_family"] == "affine"
    hashed = json.loads((out / "hashed+code_bits=20+lr=0.002-seed0" / "model" / "config.json").read_text())
    assert hashed["code_bits"] == 20 and hashed["code_family"] == "hashed"
    # Same batches, different input codes: the losses differ.
    assert runs["affine"]["val_loss"] != runs["affine+code_values=bipolar"]["val_loss"]
    table = (out / "results.md").read_text()
    assert "| affine+code_values=bipolar |" in table and "gap to affine" in table


@pytest.mark.parametrize("spec, message", [
    ("affine+seed=3", "seed is shared by every variant"),
    ("affine+batch_size=2", "batch_size is shared by every variant"),
    ("affine+code_valus=bipolar", "unknown model field 'code_valus'"),
    ("affine+code_values=ternary", "code_values"),
    ("afine", "unknown variant 'afine'"),
    ("affine+code_seed=../x", "letters, digits and _ . = + - only"),
    ("affine,affine", "listed twice"),
])
def test_bad_variant_specs_are_refused_before_training(prepared_data, tmp_path, spec, message):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=1))
    with pytest.raises(TableFreeError, match=re.escape(message)):
        compare(base, parse_variants(spec), [0], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_compare_cli_with_yaml_config(prepared_data, tmp_path, capsys):
    import yaml

    from tablefree.cli import main

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(train_overrides(prepared_data, tmp_path / "runs", max_steps=2)))
    assert main(["compare", "--config", str(config), "--variants", "minimal,learned", "--seeds", "3"]) == 0
    assert "| minimal |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "runs").iterdir()} >= {"minimal-seed3", "learned-seed3", "results.md", "results.json", "loss_curves.png"}
    assert main(["compare", "--config", str(config), "--variants", "affin"]) == 2
    assert "unknown variant 'affin'" in capsys.readouterr().err
    # The config may hold the variants, seeds and reference; flags win over it.
    config.write_text(yaml.safe_dump({**train_overrides(prepared_data, tmp_path / "study", max_steps=1),
                                      "variants": ["affine", "affine+code_layout=interleave"], "seeds": [4],
                                      "reference": ["affine+code_layout=interleave", "affine"]}))
    assert main(["compare", "--config", str(config)]) == 0
    header = capsys.readouterr().out.split("| input interface |")[1].splitlines()[0]
    assert "| gap to affine+code_layout=interleave (95% CI) | beyond noise? | gap to affine (95% CI) |" in header
    assert {p.name for p in (tmp_path / "study").iterdir()} >= {"affine-seed4", "affine+code_layout=interleave-seed4"}
    config.write_text(yaml.safe_dump({**train_overrides(prepared_data, tmp_path / "study", max_steps=1), "seeds": "x"}))
    assert main(["compare", "--config", str(config)]) == 2
    assert "is not a comma-separated list of int values" in capsys.readouterr().err
    assert main(["compare", "--config", str(config), "--seeds", "0", "--jobs", "0"]) == 2
    assert "--jobs must be between 1 and 256 runs at once, got 0" in capsys.readouterr().err


def test_compare_passes_device_and_dtype_to_training(prepared_data, tmp_path, capsys):
    import pytest
    import torch
    import yaml

    from tablefree.cli import main

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({**train_overrides(prepared_data, tmp_path / "runs", max_steps=1), "device": "cpu"}))
    assert main(["compare", "--config", str(config), "--variants", "affine", "--seeds", "0", "--dtype", "float64"]) == 2
    assert "dtype 'float64' is not one of auto, float32, bfloat16" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("the refusal below needs a machine without CUDA")
    # The flag wins over the config's device: cpu in the file, cuda asked for.
    assert main(["compare", "--config", str(config), "--variants", "affine", "--seeds", "0", "--device", "cuda"]) == 2
    assert "device cuda: no CUDA device is available" in capsys.readouterr().err


def test_every_final_model_is_scored_on_held_out_text(prepared_data, tmp_path):
    from tablefree.corpus import python_notes_documents
    from tablefree.evaluate import evaluate_model
    from tablefree.runtime import resolve_runtime

    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=2, eval_tokens=2048))
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in python_notes_documents()))
    out = tmp_path / "cmp"
    results = compare(base, ["learned", "affine"], [0], out, heldout=["python-notes", str(notes)])
    run = results["runs"][1]
    assert set(run["heldout"]) == {"python-notes", "notes.jsonl"} and run["heldout"]["python-notes"]["tokens"] == 2048
    # The built-in text is the same documents as the file: the same score, and the one `tablefree eval` gives.
    assert run["heldout"]["python-notes"] == run["heldout"]["notes.jsonl"]
    again = evaluate_model(str(out / "affine-seed0" / "model"), "python-notes", seq_len=base.seq_len, max_tokens=2048,
                           runtime=resolve_runtime("cpu", base.dtype))  # the run's own dtype
    assert again["bits_per_byte"] == run["heldout"]["python-notes"]["bits_per_byte"]
    summary = results["summary"]["affine"]["heldout"]["python-notes"]
    assert summary["bits_per_byte_mean"] == run["heldout"]["python-notes"]["bits_per_byte"]
    header = (out / "results.md").read_text().splitlines()[2]
    assert "| python-notes bits per byte | notes.jsonl bits per byte |" in header
    with pytest.raises(TableFreeError, match="no such file"):
        compare(base, ["affine"], [0], tmp_path / "other", heldout=[str(tmp_path / "missing.txt")])
    with pytest.raises(TableFreeError, match="share the name"):
        compare(base, ["affine"], [0], tmp_path / "other", heldout=[str(notes), str(notes)])


def test_english_prose_is_scored_as_python_notes_is(saved_tiny_model, tmp_path, capsys):
    from tablefree.cli import main
    from tablefree.corpus import ENGLISH_PROSE, english_prose_documents
    from tablefree.evaluate import evaluate_model
    from tablefree.runtime import resolve_runtime

    model_dir = str(saved_tiny_model[0])
    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in english_prose_documents()))
    runtime = resolve_runtime("cpu", "float32")
    scores = evaluate_model(model_dir, ENGLISH_PROSE, seq_len=64, max_tokens=2048, runtime=runtime)
    assert 0 < scores["bits_per_byte"] < math.inf and scores["tokens"] == 2048
    # The built-in text is the same documents as the file, scored the same way.
    assert scores == evaluate_model(model_dir, str(prose), seq_len=64, max_tokens=2048, runtime=runtime)
    assert main(["eval", model_dir, "--data", ENGLISH_PROSE, "--seq-len", "64", "--max-tokens", "512",
                 "--device", "cpu"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    from tablefree.compare import heldout_label

    assert heldout_label(ENGLISH_PROSE) == ENGLISH_PROSE  # a comparison takes it as a held-out text by name


def test_publish_writes_the_study_with_its_command_commit_and_machine(prepared_data, tmp_path, capsys):
    import yaml

    from tablefree.cli import main

    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({**train_overrides(prepared_data, tmp_path / "runs", max_steps=1),
                                      "variants": ["learned", "affine"], "seeds": [0, 1]}))
    published = tmp_path / "results"
    argv = ["compare", "--config", str(config), "--publish", str(published)]
    assert main(argv) == 0
    assert sorted(p.name for p in published.iterdir()) == [".tablefree-output.json", "gaps.png", "loss_curves.png",
                                                           "results.json", "results.md"]
    results = json.loads((published / "results.json").read_text())
    assert results["provenance"]["command"] == "tablefree " + " ".join(argv)
    assert results["provenance"]["commit"] and "CPUs" in results["provenance"]["machine"]
    assert results["summary"]["affine"]["gaps"]["learned"]["ci95"] is not None
    text = (published / "results.md").read_text()
    assert text.startswith(f"Generated by `tablefree {' '.join(argv)}` at commit") and "| affine |" in text
    assert (published / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Republishing writes over its own files; a directory of other files is refused, and the runs are never a target.
    assert main(argv) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["compare", "--config", str(config), "--publish", str(tmp_path / "mine")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["compare", "--config", str(config), "--publish", str(tmp_path / "runs")]) == 2
    assert "would be written over or around the input" in capsys.readouterr().err


def test_what_every_run_shares_is_checked_once_before_training(prepared_data, tmp_path):
    from tablefree.compare import failure_report

    base = make_config(train_overrides(prepared_data, tmp_path / "unused", data=str(tmp_path / "missing")))
    with pytest.raises(TableFreeError) as missing:
        compare(base, ["learned", "affine"], [0, 1], tmp_path / "cmp")
    assert str(missing.value).count("no prepared data") == 1 and not (tmp_path / "cmp").exists()
    # Failures are grouped by reason: one line however many runs a reason stopped.
    keys = [("affine", 0), ("affine", 1), ("learned", 0)]
    assert failure_report(dict.fromkeys(keys, "disk full"), 3) == "every run failed: disk full"
    report = failure_report({**dict.fromkeys(keys[:2], "disk full"), keys[2]: "bad code"}, 4)
    assert report == ("3 of 4 runs failed (the 1 others are finished and are reused when the command is run again): "
                      "affine-seed0, affine-seed1: disk full; learned-seed0: bad code")


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_run_does_not_stop_the_others_and_parallel_runs_match(prepared_data, tmp_path, jobs):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=3))
    alone = compare(base, ["affine"], [0], tmp_path / "alone")["runs"][0]
    out = tmp_path / "cmp"
    compare(base, ["learned"], [0], out)
    first = (out / "learned-seed0" / "result.json").stat().st_mtime_ns
    (out / "affine-seed1").mkdir()
    (out / "affine-seed1" / "notes.txt").write_text("the user's own file")  # train refuses a directory it did not write
    with pytest.raises(TableFreeError, match=r"1 of 4 runs failed \(the 3 others are finished") as failure:
        compare(base, ["learned", "affine"], [0, 1], out, jobs=jobs)
    assert "affine-seed1: " in str(failure.value) and "learned-seed0" not in str(failure.value)
    assert (out / "affine-seed1" / "notes.txt").read_text() == "the user's own file"
    assert all((out / name / "result.json").is_file() for name in ("learned-seed1", "affine-seed0"))
    assert "affine" not in (out / "results.md").read_text()  # no table from a comparison with a run missing
    # The same run in its own process (one thread) as in this one: the same model, up to float rounding.
    affine = json.loads((out / "affine-seed0" / "result.json").read_text())
    assert affine["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-4)
    # Once the user moves their file away, the rerun trains only the missing run.
    (out / "affine-seed1" / "notes.txt").unlink()
    results = compare(base, ["learned", "affine"], [0, 1], out, jobs=jobs)
    assert [r["name"] for r in results["runs"]] == ["learned", "learned", "affine", "affine"]
    assert (out / "learned-seed0" / "result.json").stat().st_mtime_ns == first


def test_jobs_are_refused_where_runs_cannot_share_cpu_cores(prepared_data, tmp_path, monkeypatch):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TableFreeError, match="under torchrun, leave it at 1"):
        compare(base, ["affine"], [0], tmp_path / "cmp", jobs=2)
    assert not (tmp_path / "cmp").exists()


def _run_processes(parent: int) -> list[int]:
    """The pids of `parent`'s children that run comparison runs (not multiprocessing's resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # it ended while being read
        if int(fields[1]) == parent and b"spawn_main" in command:
            pids.append(int(stat.parent.name))
    return pids


def test_stopping_a_parallel_comparison_stops_its_runs_and_a_rerun_finishes_them(prepared_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    out = tmp_path / "cmp"
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump({**train_overrides(prepared_data, out, max_steps=120, checkpoint_every=5),
                                      "variants": ["affine", "learned"], "seeds": [0]}))
    command = [sys.executable, "-m", "tablefree.cli", "compare", "--config", str(config), "--jobs", "2"]
    runs = [out / f"{name}-seed0" for name in ("affine", "learned")]

    def logged(run: Path) -> int:
        return (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").is_file() else 0

    for stop in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C of the parent alone, then a kill it cannot handle
        before = [logged(run) for run in runs]
        # Ctrl-C reaches the comparison even where this test runs with SIGINT ignored (a background job inherits that)
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        # Both runs training in their own processes, each past a checkpoint.
        while not (len(workers := _run_processes(process.pid)) == 2
                   and all(logged(run) > size and (run / CHECKPOINT).is_file() for run, size in zip(runs, before))):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(stop)
        _, err = process.communicate(timeout=120)
        if stop == signal.SIGINT:
            assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err
        deadline = time.monotonic() + 30  # orphaned runs notice within a second or two
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, f"runs still alive after {stop!r} of the comparison"
            time.sleep(0.2)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in results["runs"]] == [120, 120]
