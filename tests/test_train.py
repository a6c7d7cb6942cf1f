import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_data import prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.errors import TableFreeError
from tablefree.train import TrainConfig, batch_rows, learning_rate, load_config, make_config, train

REPO = Path(__file__).resolve().parent.parent
# One thread in every process, so a run and its resumed twin do identical arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _args(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={v}" for k, v in value.items()]
        else:
            out.append(f"{key}={value}")
    return out


def _cli(values: dict, launcher=(sys.executable, "-m", "tablefree.cli")) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "train", *_args(values)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_config_typo_names_the_key(tmp_path):
    with pytest.raises(TableFreeError, match=r"unknown training setting 'warmup_step'.*did you mean warmup_steps"):
        load_config(None, {"warmup_step": 10})
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny-affine\nbatch_sise: 4\n")
    with pytest.raises(TableFreeError, match=r"'batch_sise' in .*bad.yaml.*batch_size"):
        load_config(bad, {})
    with pytest.raises(TableFreeError, match="schedule 'linear'"):
        make_config({"schedule": "linear"})
    assert load_config(None, {"lr": "1e-3", "model.hidden_size": 48}).lr == 1e-3  # YAML reads 1e-3 as a string


def test_schedules_and_data_order():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100)
    assert learning_rate(cfg, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 100) == pytest.approx(1.0)
    assert learning_rate(cfg, 99, 100) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert learning_rate(wsd, 50, 100) == 1.0 and learning_rate(wsd, 79, 100) == 1.0
    assert learning_rate(wsd, 90, 100) == pytest.approx(0.5)


def test_batches_depend_on_data_seed_only(prepared_data):
    from tablefree.data import TokenShards

    shards = TokenShards(prepared_data, "train")
    a = batch_rows(shards, TrainConfig(seed=0, data_seed=3, seq_len=16, batch_size=4), 7)
    b = batch_rows(shards, TrainConfig(seed=9, data_seed=3, seq_len=16, batch_size=4, lr=1.0), 7)
    c = batch_rows(shards, TrainConfig(seed=0, data_seed=4, seq_len=16, batch_size=4), 7)
    assert a.shape == (4, 17) and (a == b).all() and not (a == c).all()


def test_train_saves_a_loadable_model_that_learns(prepared_data, tmp_path):
    from tablefree.evaluate import evaluate_model
    from tablefree.hub import load_model

    result = train(make_config(train_overrides(prepared_data, tmp_path / "run", max_steps=12, lr=1e-2)))
    losses = _losses(tmp_path / "run")
    assert losses[-1] < losses[0] - 0.5
    assert result["trainable_input_params"] == 0 and result["val_bits_per_byte"] > 0
    model, tokenizer = load_model(tmp_path / "run" / "model")
    assert model.config.model_type == "tablefree" and tokenizer is not None
    again = evaluate_model(str(tmp_path / "run" / "model"), str(prepared_data), seq_len=32, max_tokens=512)
    assert again["loss"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_refuses_other_tokenizer_and_changed_model(prepared_data, tmp_path, code_point_tokenizer):
    from tablefree.corpus import embedded_documents
    from tablefree.tokenizer import as_transformers, build_tokenizer

    other = tmp_path / "other-tokenizer"
    as_transformers(build_tokenizer(list(embedded_documents(max_docstring_files=0))[:20])).save_pretrained(str(other))
    with pytest.raises(TableFreeError, match="made with tokenizer .* but the model uses tokenizer"):
        train(make_config(train_overrides(prepared_data, tmp_path / "x", tokenizer=str(other))))

    run = tmp_path / "run"
    train(make_config(train_overrides(prepared_data, run, max_steps=2)))
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(TableFreeError, match=r"model config changed \(hidden_size: 32 -> 48"):
        train(make_config(train_overrides(prepared_data, run, max_steps=4, model={"hidden_size": 48, "num_hidden_layers": 1,
                                                                                    "num_attention_heads": 1, "intermediate_size": 64})))
    assert (run / "checkpoint.pt").read_bytes() == before


def test_full_disk_keeps_previous_checkpoint(prepared_data, tmp_path, monkeypatch):
    import tablefree.checkpoint as checkpoint

    run = tmp_path / "run"
    train(make_config(train_overrides(prepared_data, run, max_steps=2)))
    before = (run / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def save_until_disk_full(obj, handle):
        real_save(obj, handle)  # part of the file reaches the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(checkpoint.torch, "save", save_until_disk_full)
    with pytest.raises(TableFreeError, match="disk is full; the previous checkpoint .* is intact"):
        train(make_config(train_overrides(prepared_data, run, max_steps=4)))
    monkeypatch.undo()
    assert (run / "checkpoint.pt").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")] == []
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2


def test_sigkill_then_resume_is_bitwise_identical(prepared_data, tmp_path):
    values = train_overrides(prepared_data, tmp_path / "straight", max_steps=60, checkpoint_every=3)
    straight = _cli(values)
    killed_values = {**values, "out": str(tmp_path / "killed")}
    killed = _cli(killed_values)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # land somewhere between two checkpoints, long before step 60
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "result.json").exists(), "the kill must interrupt the run"
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < step < 60
    resumed = _cli(killed_values)
    assert resumed.wait() == 0, resumed.stdout.read()
    assert straight.wait() == 0, straight.stdout.read()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "killed")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(prepared_data, tmp_path, strategy):
    values = train_overrides(prepared_data, tmp_path / "one", max_steps=4, batch_size=4, micro_batch_size=2, grad_clip=0.5)
    one = _cli(values)
    two = _cli({**values, "out": str(tmp_path / "two"), "distributed": strategy, "micro_batch_size": 1},
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tablefree.cli"))
    assert one.wait() == 0, one.stdout.read()
    assert two.wait() == 0, two.stdout.read()
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5, rel=0)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
