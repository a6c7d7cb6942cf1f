import json
import subprocess
import sys

import pytest
import yaml

from training_data import TINY_MODEL, prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.compare import T_95
from tablefree.study import paired_difference


def study_config(tmp_path, data, points, **extra) -> str:
    values = train_overrides(data, tmp_path / "unused", max_steps=3)
    values.pop("out")
    values.update(points=points, variants=["learned", "affine"], seeds=[0, 1], heldout=["python-notes"], **extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def tablefree(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tablefree.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_a_study_runs_each_point_summarises_the_trend_and_publishes(prepared_data, tmp_path):
    wider = dict(TINY_MODEL, hidden_size=64, num_attention_heads=2)
    points = [{"name": "short", "max_steps": 2, "warmup_steps": 1},
              {"name": "long", "max_steps": 4, "warmup_steps": 1},
              {"name": "sized", "max_steps": 2, "warmup_steps": 1,
               "variants": ["learned", "affine", {"name": "affine-wide",
                                                  "variant": "affine+hidden_size=64+num_attention_heads=2"}]}]
    config = study_config(tmp_path, prepared_data, points, axis="tokens", title="toy trend")
    out, published = tmp_path / "out", tmp_path / "published"
    run = tablefree("study", "--config", config, "--out", str(out), "--publish", str(published))
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in result["points"]] == ["short", "long", "sized"]
    short, long, sized = result["points"]
    # Each point is its own schedule: its own number of steps, hence tokens.
    assert (short["tokens"], long["tokens"]) == (2 * 4 * 32, 4 * 4 * 32)
    assert short["vocab_size"] == 65536 and short["code_bits"] == 16
    # The table's share is the learned model's table over its parameters; the table-free model lacks exactly it.
    facts = short["variants"]
    assert facts["learned"]["input_table_params"] == 65536 * 32
    assert facts["learned"]["params"] - facts["affine"]["params"] == 65536 * 32
    assert short["table_share"] == pytest.approx(65536 * 32 / facts["learned"]["params"])
    # A labelled row: its own size under a name of its own, in its own directory.
    assert sized["variants"]["affine-wide"]["width"] == wider["hidden_size"]
    assert (out / "sized" / "affine-wide-seed0" / "model").is_dir()
    assert (sized["variants"]["affine-wide"]["forward_flops_per_token"]
            > sized["variants"]["affine"]["forward_flops_per_token"])
    # Gaps in bits per byte, paired by seed, equal the runs' own differences.
    runs = {(r["name"], r["seed"]): r for r in long["runs"]}
    diffs = [runs[("affine", s)]["val_bits_per_byte"] - runs[("learned", s)]["val_bits_per_byte"] for s in (0, 1)]
    assert long["bits_gaps"]["affine"]["val"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert "python-notes" in long["bits_gaps"]["affine"]
    assert (out / "long" / "affine-seed1" / "model").is_dir()
    table = (out / "results.md").read_text()
    assert "| long | 512 | 65,536 | 16 |" in table and "unigram (no model)" in table
    assert (published / "gaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provenance = json.loads((published / "results.json").read_text())["provenance"]
    assert provenance["command"].startswith("tablefree study --config")
    # A second run reuses every finished run: nothing is retrained, the figures are the same.
    stamp = (out / "long" / "affine-seed1" / "result.json").stat().st_mtime_ns
    again = tablefree("study", "--config", config, "--out", str(out), "--points", "long")
    assert again.returncode == 0, again.stderr
    assert (out / "long" / "affine-seed1" / "result.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["points"][0]["bits_gaps"] == long["bits_gaps"]


@pytest.mark.parametrize("points, message", [
    (None, "points in"),
    ([], "points in"),
    ([{"max_steps": 2}], "must be a mapping with a name"),
    ([{"name": "a"}, {"name": "a"}], "listed twice"),
    ([{"name": "a b"}], "letters, digits"),
    ([{"name": "a", "model": [1]}], "model must be a mapping"),
    ([{"name": "a", "max_steps": -1}], "max_steps"),
    ([{"name": "a", "variants": ["affine"]}], "does not compare the reference 'learned'"),
    ([{"name": "a", "variants": ["nonsense"]}], "unknown variant"),
    ([{"name": "a", "variants": ["learned", {"name": "x"}]}], "takes name and variant"),
    ([{"name": "a", "variants": ["learned", {"name": "x y", "variant": "affine"}]}], "letters, digits"),
    ([{"name": "a", "variants": ["learned", {"name": "learned", "variant": "affine"}]}], "listed twice"),
])
def test_a_bad_study_config_is_one_line_naming_the_problem(prepared_data, tmp_path, points, message):
    config = study_config(tmp_path, prepared_data, points)
    run = tablefree("study", "--config", config, "--out", str(tmp_path / "out"))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_point_or_axis_is_refused(prepared_data, tmp_path):
    config = study_config(tmp_path, prepared_data, [{"name": "a"}])
    run = tablefree("study", "--config", config, "--points", "b", "--out", str(tmp_path / "out"))
    assert run.returncode == 2 and "no point 'b'" in run.stderr
    config = study_config(tmp_path, prepared_data, [{"name": "a"}], axis="time")
    run = tablefree("study", "--config", config, "--out", str(tmp_path / "out"))
    assert run.returncode == 2 and "axis" in run.stderr


def test_paired_difference_arithmetic():
    gap = paired_difference([1.3, 1.1], [1.0, 1.0])
    assert gap["mean"] == pytest.approx(0.2)
    assert gap["ci95"] == pytest.approx(T_95[1] * 0.1)  # sd of (0.3, 0.1) is 0.1414, over sqrt(2) seeds: 0.1
    assert gap["within_noise"] is True
    assert paired_difference([1.0], [0.5]) == {"mean": 0.5, "ci95": None, "within_noise": None}
