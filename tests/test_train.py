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
from torch.optim.optimizer import register_optimizer_step_post_hook
from training_data import prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from tablefree.errors import TableFreeError
from tablefree.runtime import resolve_runtime
from tablefree.train import TrainConfig, batch_rows, check_resumable, learning_rate, make_config, read_train_config, train

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
        read_train_config(None, {"warmup_step": 10})
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny-affine\nbatch_sise: 4\n")
    with pytest.raises(TableFreeError, match=r"'batch_sise' in .*bad.yaml.*batch_size"):
        read_train_config(bad, {})
    with pytest.raises(TableFreeError, match="schedule 'linear'"):
        make_config({"schedule": "linear"})
    assert read_train_config(None, {"lr": "1e-3", "model.hidden_size": 48}).lr == 1e-3  # YAML reads 1e-3 as a string
    # A length given twice is refused rather than one silently winning (a config's max_steps over tokens=...).
    steps = tmp_path / "steps.yaml"
    steps.write_text("max_steps: 100\n")
    with pytest.raises(TableFreeError, match=r"both max_steps \(100\) and tokens \(5000\) are set .*max_steps=null"):
        read_train_config(steps, {"tokens": "5000"})
    assert read_train_config(steps, {"max_steps": None, "tokens": "50000"}).steps() == 50000 // (32 * 256)


CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_files_hold_only_what_differs_from_the_defaults(path):
    import yaml

    from tablefree.study import STUDY_KEYS
    from tablefree.train import train_config_from

    defaults = TrainConfig()
    # A comparison's config (configs/study.yaml) also names its variants, seeds, references and held-out texts, and
    # a study's (configs/study-*.yaml) its points, axis and title.
    values = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in STUDY_KEYS}
    same = [k for k, v in values.items() if k != "model" and getattr(defaults, k) == v]
    assert not same, f"{path.name} restates defaults: {same}"
    assert train_config_from(values, {}, where=path.name).size in ("tiny", "small", "paper")


def test_one_paper_config_for_every_variant():
    from tablefree.train import model_config

    assert [p.name for p in CONFIGS if p.name.startswith("paper")] == ["paper.yaml"]
    for variant in ("learned", "minimal", "affine"):
        cfg = read_train_config(REPO / "configs" / "paper.yaml", {"variant": variant})
        config = model_config(cfg)
        assert (cfg.size, cfg.variant) == ("paper", variant)
        assert (config.num_hidden_layers, config.hidden_size, config.max_position_embeddings) == (32, 1024, 1024)
        assert config.model_type == ("gpt_neox" if variant == "learned" else "tablefree")


def test_a_preset_is_a_size_and_a_variant_kept_apart():
    cfg = make_config({"preset": "tiny-minimal"})
    assert (cfg.size, cfg.variant) == ("tiny", "minimal") and not hasattr(cfg, "preset")
    with pytest.raises(TableFreeError, match="preset and variant both set"):
        make_config({"preset": "tiny-affine", "variant": "minimal"})
    with pytest.raises(TableFreeError, match="variant 'minimum' is not one of learned, minimal, affine"):
        make_config({"variant": "minimum"})
    with pytest.raises(TableFreeError, match="size 'huge' is not one of paper, small, tiny"):
        make_config({"size": "huge"})


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
    assert (result["size"], result["variant"]) == ("tiny", "affine") and "preset" not in result
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
    before = (run / CHECKPOINT).read_bytes()
    with pytest.raises(TableFreeError, match=r"model config changed \(hidden_size: 32 -> 48"):
        train(make_config(train_overrides(prepared_data, run, max_steps=2, model={"hidden_size": 48, "num_hidden_layers": 1,
                                                                                    "num_attention_heads": 1, "intermediate_size": 64})))
    assert (run / CHECKPOINT).read_bytes() == before


def test_full_disk_keeps_previous_checkpoint(prepared_data, tmp_path, monkeypatch):
    import tablefree.checkpoint as checkpoint

    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=4, schedule="wsd", decay_fraction=0.0, checkpoint_every=2)
    train(make_config({**values, "max_steps": 2}))
    before = (run / CHECKPOINT).read_bytes()
    real_save = checkpoint.save_file

    def save_until_disk_full(tensors, filename, metadata):
        real_save(tensors, filename, metadata=metadata)  # the file reaches the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(checkpoint, "save_file", save_until_disk_full)
    with pytest.raises(TableFreeError, match="disk is full; the previous checkpoint .* is intact"):
        train(make_config(values))
    monkeypatch.undo()
    assert (run / CHECKPOINT).read_bytes() == before
    assert [p.name for p in run.iterdir() if "tmp" in p.name] == []
    assert load_checkpoint(run / CHECKPOINT)["step"] == 2


def test_sigkill_then_resume_is_bitwise_identical(prepared_data, tmp_path):
    values = train_overrides(prepared_data, tmp_path / "straight", max_steps=60, checkpoint_every=3)
    straight = _cli(values)
    killed_values = {**values, "out": str(tmp_path / "killed")}
    killed = _cli(killed_values)
    checkpoint = tmp_path / "killed" / CHECKPOINT
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # land somewhere between two checkpoints, long before step 60
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()
    assert not (tmp_path / "killed" / "result.json").exists(), "the kill must interrupt the run"
    step = load_checkpoint(checkpoint)["step"]
    assert 0 < step < 60
    resumed = _cli(killed_values)
    assert resumed.wait() == 0, resumed.stdout.read()
    assert [p.name for p in (tmp_path / "killed").iterdir() if "tmp" in p.name] == []  # a write cut short is cleaned
    assert straight.wait() == 0, straight.stdout.read()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "killed")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(prepared_data, tmp_path, strategy):
    # float32: bfloat16 rounds the two micro-batchings differently, and this compares to 1e-5.
    values = train_overrides(prepared_data, tmp_path / "one", max_steps=4, batch_size=4, micro_batch_size=2, grad_clip=0.5,
                             dtype="float32")
    one = _cli(values)
    two = _cli({**values, "out": str(tmp_path / "two"), "distributed": strategy, "micro_batch_size": 1},
               launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tablefree.cli"))
    assert one.wait() == 0, one.stdout.read()
    assert two.wait() == 0, two.stdout.read()
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5, rel=0)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)



@pytest.mark.slow
def test_fsdp_checkpoints_resume_across_strategies(prepared_data, tmp_path):
    # wsd without decay keeps the learning rate of steps taken when the length grows, so each leg may lengthen the run.
    values = train_overrides(prepared_data, tmp_path / "straight", max_steps=4, batch_size=4, micro_batch_size=1,
                             grad_clip=0.5, schedule="wsd", decay_fraction=0.0, dtype="float32")
    straight = _cli(values)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tablefree.cli")
    legs = [(2, "fsdp", torchrun), (3, "none", (sys.executable, "-m", "tablefree.cli")), (4, "fsdp", torchrun)]
    for resumed, (steps, strategy, launcher) in zip([None, 2, 3], legs):
        leg = _cli({**values, "out": str(tmp_path / "legs"), "max_steps": steps, "distributed": strategy}, launcher=launcher)
        output = leg.communicate()[0]
        assert leg.returncode == 0, output
        assert ("from its checkpoint at step" not in output) if resumed is None else (f"at step {resumed}\n" in output)
    assert straight.wait() == 0, straight.stdout.read()
    assert _losses(tmp_path / "legs") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-5, rel=0)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "legs")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_checkpoint_round_trips_without_pickle(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    payload = {
        "step": 3, "loss": float("nan"), "betas": (0.9, 0.95), "none": None, "text": "\u00e9",
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3, dtype=torch.bfloat16)}},
                      "param_groups": [{"params": [0], "lr": 1e-3}]},
        "model": {"embed_in.weight": shared, "embed_out.weight": shared},  # tied weights share storage
        "rng": {"torch": torch.get_rng_state(), "cuda": [torch.get_rng_state()]},
    }
    save_checkpoint(tmp_path / CHECKPOINT, payload)
    loaded = load_checkpoint(tmp_path / CHECKPOINT)
    assert loaded["step"] == 3 and loaded["betas"] == (0.9, 0.95) and loaded["none"] is None and loaded["text"] == "\u00e9"
    assert loaded["loss"] != loaded["loss"]  # NaN survives (in the checkpoint only; result files are strict JSON)
    state = loaded["optimizer"]["state"]
    assert list(state) == [0] and state[0]["exp_avg"].dtype == torch.bfloat16 and torch.equal(state[0]["step"], torch.tensor(3.0))
    assert torch.equal(loaded["model"]["embed_out.weight"], shared) and torch.equal(loaded["rng"]["cuda"][0], torch.get_rng_state())
    assert (tmp_path / CHECKPOINT).read_bytes()[:8] != b"PK\x03\x04"  # not torch.save's zip of pickles
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / CHECKPOINT).stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600


def test_pickle_checkpoint_is_refused_never_unpickled(prepared_data, tmp_path):
    ran = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"step": 1, "trap": Payload()}, run / "checkpoint.pt")
    with pytest.raises(TableFreeError, match=r"checkpoint.pt is a checkpoint in the pickle format .* no longer loads"):
        train(make_config(train_overrides(prepared_data, run, max_steps=2)))
    assert not ran.exists()


def _tensor_offset(path: Path, name: str) -> int:
    """Where the bytes of tensor `name` start in a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return 8 + size + json.loads(raw[8 : 8 + size])[name]["data_offsets"][0]


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "tensor bytes":
        at = _tensor_offset(path, "model/lm_head.weight") + 4096
        raw[at : at + 4096] = os.urandom(4096)
    elif how == "header number":
        at = raw.index(b"0.003")  # the learning rate recorded in the JSON header
        raw[at : at + 5] = b"0.004"
    elif how == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(os.urandom(len(raw)))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("tensor bytes", r"damaged: the bytes of tensor 'model/lm_head.weight' differ from the checksum"),
    ("header number", r"damaged: its header differs from the checksum"),
    ("truncated", r"cannot be read"),
    ("random", r"cannot be read"),
])
def test_damaged_checkpoint_is_refused_naming_what(prepared_data, tmp_path, how, message):
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=2, save_model=False)
    train(make_config(values))
    _damage(run / CHECKPOINT, how)
    with pytest.raises(TableFreeError, match=rf"the checkpoint .*{CHECKPOINT} .*{message}.*delete .* or train into a new out"):
        train(make_config(values))


def test_resume_refuses_settings_that_change_the_trajectory(prepared_data, tmp_path):
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=4, save_model=False)
    train(make_config(values))
    before = (run / CHECKPOINT).read_bytes()
    other_dtype = "float32" if resolve_runtime("cpu").dtype == torch.bfloat16 else "bfloat16"  # not what auto chose
    for key, value in [("seq_len", 16), ("batch_size", 2), ("lr", 1e-2), ("data_seed", 1), ("seed", 1),
                       ("warmup_steps", 1), ("grad_clip", 0.5), ("weight_decay", 0.0), ("dtype", other_dtype)]:
        with pytest.raises(TableFreeError, match=rf"settings that fix the training trajectory changed \({key}: "):
            train(make_config({**values, key: value}))
    with pytest.raises(TableFreeError, match=r"length changed from 4 to 6 steps, which changes the cosine learning rate"):
        train(make_config({**values, "max_steps": 6}))
    assert (run / CHECKPOINT).read_bytes() == before
    # Settings that only change how the same computation runs, or what is reported, are accepted.
    same = {"log_every": 3, "eval_tokens": 256, "checkpoint_every": 1, "micro_batch_size": 2, "progress": False,
            "tokens": 4 * 4 * 32, "max_steps": None}
    assert train(make_config({**values, **same}))["steps"] == 4


def test_a_new_length_is_accepted_only_when_the_steps_taken_keep_their_learning_rates():
    def saved(cfg: TrainConfig, step: int, total: int) -> dict:
        return {"model_config": {}, "train_config": dict(vars(cfg)), "tokenizer_hash": "t", "data": "d",
                "compute_dtype": "float32", "step": step, "total_steps": total}

    def current(total: int) -> dict:
        return {"model_config": {}, "tokenizer_hash": "t", "data": "d", "compute_dtype": "float32", "total_steps": total}

    cosine = TrainConfig(warmup_steps=10)
    check_resumable(saved(cosine, 11, 100), current(200), cosine, Path("c"))  # warmup, and the cosine's first step
    with pytest.raises(TableFreeError, match="length changed from 100 to 200 steps"):
        check_resumable(saved(cosine, 12, 100), current(200), cosine, Path("c"))
    wsd = TrainConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    check_resumable(saved(wsd, 81, 100), current(1000), wsd, Path("c"))  # the decay had not begun: lengthened
    with pytest.raises(TableFreeError, match="length changed from 100 to 1000 steps"):
        check_resumable(saved(wsd, 82, 100), current(1000), wsd, Path("c"))
    with pytest.raises(TableFreeError, match="at step 80, past the 50 steps now set"):
        check_resumable(saved(wsd, 80, 100), current(50), wsd, Path("c"))


def test_metrics_resume_drops_a_torn_tail_and_writes_strict_json(tmp_path):
    from tablefree.metrics import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 1.5}\n{"step": 4, "lo')
    log = MetricsLog(tmp_path, enabled=True, resume_step=2)
    log.log(3, loss=float("inf"), note="\u00e9")
    log.close()
    rows = [_strict_json(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}, {"step": 3, "loss": None, "note": "\u00e9"}]
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(TableFreeError, match=r"line 2 of .*metrics.jsonl is damaged .* fix or delete that line"):
        MetricsLog(tmp_path, enabled=True, resume_step=3)
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'  # nothing lost
    path.write_bytes(b'{"step": 1}\n\xff\xfe')  # a kill mid-character tears the tail too
    assert read_metrics(path) == [{"step": 1}]


def test_a_run_resumed_at_its_end_writes_strict_json_results(prepared_data, tmp_path):
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=2)
    first = train(make_config(values))
    (run / "result.json").unlink()  # killed during the final validation
    again = train(make_config(values))
    written = _strict_json((run / "result.json").read_text())
    assert written["train_loss"] == first["train_loss"] and again["val_loss"] == pytest.approx(first["val_loss"])
    assert written["tokens_per_s"] is None  # nothing was trained in the resumed process


@pytest.mark.parametrize("kind", ["loss", "weights"])
def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(prepared_data, tmp_path, kind):
    # A real divergence of the loss: an enormous decoupled weight decay. Weights that an optimizer step makes
    # non-finite while the loss before it was finite come from chaotic runs (Adam without a second-moment average
    # did it within 8 steps on one CPU and not on another), so a NaN is written into one weight after the 3rd step.
    extra = {"lr": 1.0, "weight_decay": 1e30} if kind == "loss" else {}
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=8, warmup_steps=0, checkpoint_every=1, **extra)
    steps = []

    def poison(optimizer, args, kwargs) -> None:
        steps.append(optimizer)
        if kind == "weights" and len(steps) == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    hook = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(TableFreeError, match=r"training diverged: .* at step (\d+); the checkpoint of step (\d+) in .* is kept") as caught:
            train(make_config(values))
    finally:
        hook.remove()
    message = str(caught.value)
    assert ("the loss is nan" in message) == (kind == "loss") and ("are not finite" in message) == (kind == "weights")
    failed, kept = (int(n) for n in __import__("re").search(r"at step (\d+).* step (\d+)", message).groups())
    state = load_checkpoint(run / CHECKPOINT)
    assert kept == failed - 1 == state["step"]
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "result.json").exists()


def test_out_directory_is_claimed_never_taken(prepared_data, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    values = train_overrides(prepared_data, precious, max_steps=1, save_model=False)
    with pytest.raises(TableFreeError, match=r"output directory .*mine exists and is not empty .*--force"):
        train(make_config(values))
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    train(make_config({**values, "force": True}))
    assert (precious / "notes.txt").read_text() == "keep me" and (precious / CHECKPOINT).is_file()
    train(make_config(values))  # now it is a train output: resumable without force
    for out in (prepared_data, prepared_data / "inside", prepared_data.parent):
        with pytest.raises(TableFreeError, match=r"the output .* (would be written over or around|lies inside) the input"):
            train(make_config({**values, "out": str(out), "force": True}))


def test_temporaries_of_a_killed_checkpoint_write_are_removed(prepared_data, tmp_path):
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=2, save_model=False)
    train(make_config(values))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / f".{CHECKPOINT}.tablefree-tmp-{int(dead.stdout)}-0a1b2c3d"
    stale.mkdir()
    (stale / CHECKPOINT).write_bytes(b"half a checkpoint")
    train(make_config(values))
    assert not stale.exists() and load_checkpoint(run / CHECKPOINT)["step"] == 2


def _main(capsys, *args) -> tuple[int, str]:
    from tablefree.cli import main

    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_missing_inputs_are_named(prepared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _main(capsys)
    assert code == 2 and err.count("\n") == 1
    assert "no prepared data at runs/data" in err and "max_steps=N or tokens=N" in err and "configs/" in err
    code, err = _main(capsys, f"data={tmp_path / 'nodata'}", "max_steps=2")
    assert code == 2 and f"no prepared data at {tmp_path / 'nodata'}" in err and "tokenizer" not in err
    code, err = _main(capsys, f"data={prepared_data}")
    assert code == 2 and "the training length is not set" in err and "prepared data" not in err
    code, err = _main(capsys, "--force", f"data={prepared_data}", "max_steps=1", "lr=2", "out=x")
    assert code == 2 and "lr must be a positive number up to 1" in err


SETTINGS = [f.name for f in __import__("dataclasses").fields(TrainConfig)]
MODEL_KEYS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "code_scale",
              "code_layout", "code_values", "max_position_embeddings", "vocab_size", "affine_seed"]
JUNK = [
    "abc", "", "\ud800", "a\x00b", "null", "true", "[1, 2]", "{a: 1}", "-1", "0", "3", "65", "1e400", "-1e-400", ".nan",
    ".inf", "-.inf", "1e-50", "1.5", str(2**64), str(-(2**63)), "0x10", "'\udcff'", "~", "2024-01-01",
]


def _fuzz_values():
    from hypothesis import strategies as st

    return st.one_of(st.sampled_from(JUNK), st.text(max_size=12), st.integers(-(2**70), 2**70).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def _assert_no_traceback(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_fuzzed_settings_never_give_a_traceback(tmp_path_factory, capsys):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    nodata = tmp_path_factory.mktemp("fuzz") / "nodata"
    keys = st.one_of(st.sampled_from(SETTINGS), st.sampled_from([f"model.{k}" for k in MODEL_KEYS]),
                     st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=10))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(keys, _fuzz_values(), max_size=4))
    def run(overrides):
        args = ["preset=tiny-affine", "max_steps=1", f"data={nodata}", *(f"{k}={v}" for k, v in overrides.items())]
        _assert_no_traceback(*_main(capsys, *args))

    run()


@pytest.mark.slow
def test_fuzzed_settings_of_real_runs_never_give_a_traceback(prepared_data, tmp_path_factory, capsys):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    # Settings that keep a run cheap whatever their value (sizes and lengths stay fixed).
    light = ["lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay", "beta1", "beta2",
             "grad_clip", "seed", "data_seed", "log_every", "eval_every", "checkpoint_every", "dtype", "device",
             "distributed", "micro_batch_size", "peak_flops", "variant", "force", "model.code_scale",
             "model.code_layout", "model.code_values", "model.affine_seed"]
    base = {k: v for k, v in train_overrides(prepared_data, Path("unused"), max_steps=2, batch_size=2, seq_len=16,
                                              eval_tokens=64, save_model=False).items() if k != "out"}

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.sampled_from(light), _fuzz_values(), max_size=3))
    def run(overrides):
        out = tmp_path_factory.mktemp("run")
        args = [*_args(base), f"out={out}", *(f"{k}={v}" for k, v in overrides.items())]
        _assert_no_traceback(*_main(capsys, *args))

    run()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(prepared_data, tmp_path):
    values = train_overrides(prepared_data, tmp_path / "run", max_steps=100_000, checkpoint_every=0)
    first = _cli(values)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None  # the first run is training
        second = _cli({**values, "seed": 1, "max_steps": 3})
        output = second.communicate()[0]
        assert second.returncode == 2
        assert output.splitlines()[-1].startswith(f"error: the output directory {tmp_path / 'run'} is in use by another "
                                                  f"tablefree command (pid {first.pid}: ")
        assert f"-m tablefree.cli train data={prepared_data} out={tmp_path / 'run'} " in output.splitlines()[-1]
    finally:
        first.kill()
        first.wait()
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's rows only


@pytest.mark.parametrize("written", ["model", "metrics.jsonl", "tensorboard", CHECKPOINT, "result.json"])
def test_a_resumed_run_never_writes_through_a_symlink(prepared_data, tmp_path, saved_tiny_model, written):
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(saved_tiny_model[0], other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    run = tmp_path / "run"
    values = train_overrides(prepared_data, run, max_steps=4, schedule="wsd", decay_fraction=0.0)
    train(make_config({**values, "max_steps": 2, "save_model": False}))  # a run stopped after its first checkpoint
    target = {"model": other, "tensorboard": other, "metrics.jsonl": tmp_path / "dangling.jsonl",
              CHECKPOINT: other / "model.safetensors", "result.json": other / "config.json"}[written]
    if (run / written).exists():
        (run / written).unlink()
    (run / written).symlink_to(target)
    for force in (False, True):
        with pytest.raises(TableFreeError, match=f"{run / written} is a symbolic link; tablefree never writes through one"):
            train(make_config({**values, "force": force}))
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert not (tmp_path / "dangling.jsonl").exists()


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without the measured speeds (tokens/s and MFU differ from run to run)."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu")} for row in rows]


def test_a_kill_while_the_final_model_is_written_then_resume_leaves_metrics_as_a_straight_run(prepared_data, tmp_path):
    values = train_overrides(prepared_data, tmp_path / "straight", max_steps=3, checkpoint_every=2, eval_every=2)
    train(make_config(values))
    killed = tmp_path / "killed"
    train(make_config({**values, "out": str(killed)}))
    # What a kill -9 while the final model is written leaves: its model half-written in a temporary of a dead
    # process beside OUT/model, and no model or result.json yet; everything written before it stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / "model").rename(killed / f".model.tablefree-tmp-{int(dead.stdout)}-0a1b2c3d")
    (killed / f".model.tablefree-tmp-{int(dead.stdout)}-0a1b2c3d" / "model.safetensors").write_bytes(b"half")
    (killed / "result.json").unlink()
    train(make_config({**values, "out": str(killed)}))
    assert _rows(killed) == _rows(tmp_path / "straight")
    assert [r["step"] for r in _rows(killed) if "val_loss" in r] == [2, 3]
    assert (killed / "model" / "config.json").is_file() and not list(killed.glob(".model.tablefree-tmp-*"))
