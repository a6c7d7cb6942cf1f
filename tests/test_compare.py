import json

from training_data import prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.checkpoint import CHECKPOINT
from tablefree.compare import compare, summarise
from tablefree.train import make_config


def test_toy_matched_comparison_writes_table_json_and_plot(prepared_data, tmp_path, capsys):
    base = make_config(train_overrides(prepared_data, tmp_path / "unused", max_steps=3, checkpoint_every=2))
    out = tmp_path / "cmp"
    results = compare(base, ["learned", "affine"], [0, 1], out)
    assert (out / "results.json").is_file() and (out / "loss_curves.png").stat().st_size > 5000
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| learned |" in table and "| affine |" in table and " ± " in table
    assert "| +0.0% |" in table.split("| learned |")[1].splitlines()[0]  # learned is its own reference
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["learned"]["trainable_input_params"] == 65536 * 32 and summary["affine"]["trainable_input_params"] == 0
    assert summary["learned"]["gap_to_learned"] == 0
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
        {"variant": "learned", "val_ppl": 2.4, "val_bits_per_byte": 1.0, "trainable_input_params": 10},
        {"variant": "learned", "val_ppl": 2.6, "val_bits_per_byte": 1.2, "trainable_input_params": 10},
        {"variant": "affine", "val_ppl": 2.45, "val_bits_per_byte": 1.05, "trainable_input_params": 0},
    ]
    summary = summarise(runs, ["learned", "affine"])
    assert abs(summary["learned"]["val_ppl_mean"] - 2.5) < 1e-12
    assert abs(summary["learned"]["seed_spread"] - 0.08) < 1e-12
    assert abs(summary["affine"]["gap_to_learned"] - (2.45 / 2.5 - 1)) < 1e-12


def test_compare_cli_with_yaml_config(prepared_data, tmp_path, capsys):
    import yaml

    from tablefree.cli import main

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(train_overrides(prepared_data, tmp_path / "runs", max_steps=2)))
    assert main(["compare", "--config", str(config), "--variants", "minimal,learned", "--seeds", "3"]) == 0
    assert "| minimal |" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "runs").iterdir()} >= {"minimal-seed3", "learned-seed3", "results.md", "results.json", "loss_curves.png"}
    assert main(["compare", "--config", str(config), "--variants", "affin"]) == 2
    assert "unknown variant(s) affin" in capsys.readouterr().err


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
