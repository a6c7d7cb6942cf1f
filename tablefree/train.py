"""`tablefree train --config FILE [key=value ...]`: one trainer for one CPU process or many GPUs via torchrun.

The loop is short on purpose: data windows come from `data.TokenShards`, wrapping from
`distributed`, checkpoints from `checkpoint`, metrics and MFU from `metrics`, validation from
`evaluate`. Data order is a function of (data_seed, step) alone and initialisation of the model
seed alone, so variants trained at one data seed see identical batches, and a resumed run replays
the identical trajectory.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TableFreeError
from .files import write_json
from .presets import SIZES, VARIANTS, split_preset
from .runtime import DEVICE_HELP

if TYPE_CHECKING:  # torch and numpy load when training starts, so `tablefree train --help` stays light
    import numpy as np
    import torch

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "float32", "bfloat16")
WHERE_SETTINGS_GO = "(as key=value on the command line, or in a YAML file given with --config; examples in configs/)"
# Settings that fix the trajectory, refused when a resume changes them (beside model, tokenizer, data,
# compute dtype and length); the others only change how the same computation runs, or what is reported.
TRAJECTORY = ("seed", "data_seed", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "schedule",
              "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip")


def setting(default, help: str):
    """A training setting: its default and its meaning, written once (`tablefree train --help` lists them)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = setting("runs/data", "a directory made by `tablefree data prepare`")
    tokenizer: str | None = setting(None, "the model's tokenizer (default: the one the data was prepared with)")
    out: str = setting("runs/train", "output directory: checkpoint, metrics.jsonl, result.json, model/")
    size: str = setting("small", f"model size, one of {', '.join(SIZES)} (see `tablefree new --help`)")
    variant: str = setting("affine", f"input interface, one of {', '.join(VARIANTS)}")
    model: dict = setting({}, "model-field overrides, e.g. model.hidden_size=128 (YAML: model: {hidden_size: 128})")
    seed: int = setting(0, "model seed: initialisation depends on it alone")
    data_seed: int = setting(0, "data order depends on it alone")
    seq_len: int = setting(256, "tokens per training window")
    batch_size: int = setting(32, "sequences per optimizer step, over all processes")
    micro_batch_size: int | None = setting(None, "sequences per forward pass per process (default: all of this rank's)")
    max_steps: int | None = setting(None, "optimizer steps (this or tokens must be set)")
    tokens: int | None = setting(None, "alternative to max_steps: train tokens (steps = tokens / (batch_size * seq_len))")
    lr: float = setting(3e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = setting(100, "steps of linear warmup")
    schedule: str = setting("cosine", "cosine, or wsd (warmup-stable-decay)")
    decay_fraction: float = setting(0.2, "wsd: the final fraction of steps that decays")
    weight_decay: float = setting(0.1, "AdamW weight decay of the weight matrices")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "gradient-norm clipping; 0 disables it")
    eval_every: int = setting(0, "steps between validations; 0: only at the end")
    eval_tokens: int = setting(65536, "validation tokens per evaluation")
    checkpoint_every: int = setting(200, "steps between checkpoints; 0: only at the end")
    log_every: int = setting(10, "steps between metrics.jsonl lines")
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", "compute dtype: auto (bfloat16 autocast on CUDA, float32 elsewhere), float32, bfloat16")
    compile: bool = setting(False, "torch.compile the model")
    distributed: str = setting("auto", "auto (ddp under torchrun), none, ddp, fsdp")
    progress: bool = setting(True, "show a progress bar")
    peak_flops: float | None = setting(None, "MFU denominator (default: GPU datasheet or measured CPU matmul rate)")
    save_model: bool = setting(True, "save the trained model in the Hugging Face form in OUT/model")
    force: bool = setting(False, "also write into a non-empty out that is not a train output (others' files stay untouched)")

    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.tokens is not None:
            return max(1, self.tokens // (self.batch_size * self.seq_len))
        raise TableFreeError(f"the training length is not set: set max_steps=N or tokens=N {WHERE_SETTINGS_GO}")


def read_train_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """A TrainConfig from YAML plus `key=value` overrides (`model.hidden_size=64` for model fields)."""
    return train_config_from(read_settings_file(path), overrides, where=str(path) if path else "the command line")


def read_settings_file(path: str | Path | None) -> dict:
    """The mapping a YAML settings file holds ({} without a file)."""
    import yaml

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise TableFreeError(f"no config file at {path}")
    try:
        values = yaml.safe_load(path.read_bytes()) or {}
    except OSError as exc:
        raise TableFreeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:  # also text that is not UTF-8
        raise TableFreeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise TableFreeError(f"{path} must hold a mapping of training settings")
    return dict(values)


def train_config_from(values: dict, overrides: dict, where: str) -> TrainConfig:
    """A TrainConfig from settings `values` with `key=value` overrides on top (`model.KEY` for model fields)."""
    values = dict(values)
    model = values.pop("model", None)
    model = {} if model is None else model
    for key, value in overrides.items():
        if key == "model" or key.startswith("model."):
            update = value if key == "model" else {key[len("model."):]: value}
            if not isinstance(model, dict) or not isinstance(update, dict):
                bad = update if isinstance(model, dict) else model
                raise TableFreeError(f"model settings must be a mapping of model fields (model.KEY=value), got {bad!r}")
            model = {**model, **update}
        else:
            values[key] = value
    values["model"] = model
    return make_config(values, where=where)


def make_config(values: dict, where: str = "the config") -> TrainConfig:
    """A checked TrainConfig from setting values; `preset: SIZE-VARIANT` is short for the two settings."""
    values = _split_preset(values, where)
    known = {f.name: f for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise TableFreeError(f"unknown training setting {key!r} in {where}{hint}")
    config = TrainConfig(**{k: _coerce(known[k], v, where) for k, v in values.items()})
    for name, choices in (("size", SIZES), ("variant", VARIANTS), ("schedule", SCHEDULES), ("dtype", DTYPES)):
        if getattr(config, name) not in choices:
            raise TableFreeError(f"{name} {getattr(config, name)!r} is not one of {', '.join(choices)}")
    for name, (accepts, what) in LIMITS.items():
        value = getattr(config, name)
        if value is not None and not accepts(value):
            raise TableFreeError(f"{name} must be {what}, got {value!r}")
    if config.max_steps is not None and config.tokens is not None:  # one would silently win over the other
        raise TableFreeError(f"both max_steps ({config.max_steps}) and tokens ({config.tokens}) are set in {where}; "
                             f"set one (max_steps=null clears a config's max_steps)")
    return config


def _split_preset(values: dict, where: str) -> dict:
    if "preset" not in values:
        return values
    rest = {k: v for k, v in values.items() if k != "preset"}
    given = [name for name in ("size", "variant") if name in rest]
    if given:
        raise TableFreeError(f"preset and {' and '.join(given)} both set in {where}: a preset is a size and a variant "
                             f"(SIZE-VARIANT); set either preset or size and variant")
    size, variant = split_preset(str(values["preset"]))
    return {**rest, "size": size, "variant": variant}


def _integer(low: int, high: int = 2**63 - 1) -> tuple:
    return (lambda v: low <= v <= high, f"an integer from {low} to {high:,}")


# What each number setting accepts (an optional one may also be left unset).
LIMITS = {
    "seed": _integer(0, 2**64 - 1), "data_seed": _integer(0, 2**64 - 1), "seq_len": _integer(1), "batch_size": _integer(1),
    "micro_batch_size": _integer(1), "max_steps": _integer(1), "tokens": _integer(1), "warmup_steps": _integer(0),
    "eval_every": _integer(0), "eval_tokens": _integer(1), "checkpoint_every": _integer(0), "log_every": _integer(1),
    "lr": (lambda v: 0 < v <= 1, "a positive number up to 1 (AdamW moves each weight by about lr a step)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "decay_fraction": (lambda v: 0 <= v <= 1, "from 0 to 1"),
    "weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "beta1": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "beta2": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "grad_clip": (lambda v: v >= 0, "a non-negative number (0 disables clipping)"),
    "peak_flops": (lambda v: v > 0, "a positive number"),
}


def _coerce(spec, value, where: str):
    """Give a setting its declared type: YAML reads `1e-3` as text, `3.0` as a float, `2024` as an int."""
    kinds = str(spec.type)
    expected = next(kind for kind in ("bool", "int", "float", "str", "dict") if kind in kinds)
    if value is None and "None" in kinds:
        return None
    converted = _as_type(expected, value)
    if converted is None:
        names = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "non-empty text usable as a file name",
                 "dict": "a mapping of model fields (model.KEY=value)"}
        raise TableFreeError(f"setting {spec.name!r} in {where} expects {names[expected]}, got {value!r}")
    return converted


def _as_type(expected: str, value):
    """`value` as the type named `expected`, or None when it is not one."""
    if isinstance(value, bool) or expected == "bool":
        return value if isinstance(value, bool) and expected == "bool" else None
    if expected == "dict":
        return value if isinstance(value, dict) and all(isinstance(k, str) for k in value) else None
    if expected == "str":
        text = str(value) if isinstance(value, (str, int, float)) else ""
        return text if text and "\0" not in text and _encodable(text) else None
    if expected == "int" and isinstance(value, int):
        return value
    try:
        number = float(value) if isinstance(value, (int, float, str)) else math.nan
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number):
        return None
    if expected == "float":
        return number
    return int(number) if number == int(number) else None


def _encodable(text: str) -> bool:
    """Whether `text` can be a file name here (a lone surrogate from a YAML escape cannot)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def model_config(cfg: TrainConfig, tokenizer=None):
    """The model config of a run; with the data's tokenizer, V and the special ids follow from it (model.* still wins)."""
    from .presets import sized_config, tokenizer_fields

    overrides = {**(tokenizer_fields(tokenizer) if tokenizer is not None else {}), **cfg.model}
    config = sized_config(cfg.size, cfg.variant, **overrides)
    if cfg.seq_len > config.max_position_embeddings:
        raise TableFreeError(f"seq_len {cfg.seq_len} exceeds the model's context ({config.max_position_embeddings})")
    return config


def config_fingerprint(config) -> dict:
    """The model config as it determines the weights' meaning (bookkeeping fields left out)."""
    volatile = {"transformers_version", "architectures", "auto_map", "_name_or_path", "dtype", "torch_dtype"}
    return {k: v for k, v in json.loads(config.to_json_string()).items() if k not in volatile}


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine to min_lr, or (wsd) constant then a linear decay over the last steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - floor) * (step - decay_start) / max(1, total - decay_start)


def batch_rows(shards, cfg: TrainConfig, step: int) -> np.ndarray:
    """The global batch of step `step`: (batch_size, seq_len + 1) windows drawn from (data_seed, step) alone."""
    import numpy as np

    counts = shards.window_starts(cfg.seq_len + 1)
    rng = np.random.Generator(np.random.PCG64([cfg.data_seed, step]))
    return shards.windows(rng.integers(0, int(counts.sum()), size=cfg.batch_size), cfg.seq_len + 1)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    import torch

    # Decay matrices only; biases and LayerNorm gains keep their scale.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def trainable_input_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.get_input_embeddings().parameters() if p.requires_grad)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) into cfg.out; returns the summary also written to OUT/result.json."""
    from .distributed import close_world, init_world

    config = model_config(cfg)  # every setting is checked before a process group or a file is touched
    check_given(cfg)
    world = init_world(cfg.device, cfg.dtype)
    try:
        with contextlib.ExitStack() as held:
            return _train(cfg, config, world, held)
    finally:
        close_world(world)


def check_given(cfg: TrainConfig) -> None:
    """The two things a run cannot default: data to train on and a length."""
    missing = []
    try:
        data_exists = Path(cfg.data).exists()
    except OSError as exc:  # a name too long for the file system, for one
        raise TableFreeError(f"data={cfg.data!r} cannot be used: {exc.strerror or exc}") from None
    if not data_exists:
        missing.append(f"there is no prepared data at {cfg.data} (set data=DIR to a directory made by `tablefree data prepare`)")
    if cfg.max_steps is None and cfg.tokens is None:
        missing.append("the training length is not set (set max_steps=N or tokens=N)")
    if missing:
        raise TableFreeError(f"{'; '.join(missing)} {WHERE_SETTINGS_GO}")


def data_fingerprint(shards) -> str:
    """What fixes the batches of a prepared directory, cheaply: its train shards (names, sizes) and tokenizer."""
    listing = [[s["file"], s["tokens"]] for s in shards.manifest["shards"] if s["split"] == "train"]
    digest = hashlib.sha256(json.dumps([shards.manifest["tokenizer_hash"], listing]).encode()).hexdigest()[:16]
    return f"{shards.tokens:,} train tokens, shards {digest}"


def check_resumable(saved: dict, current: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse a resume that would not continue the saved run's trajectory, naming what changed."""
    from .checkpoint import check_same_model

    check_same_model(saved["model_config"], current["model_config"], path)
    before = saved["train_config"]
    changed = {k: (before.get(k), getattr(cfg, k)) for k in TRAJECTORY if before.get(k) != getattr(cfg, k)}
    for key, name in (("tokenizer_hash", "tokenizer"), ("data", "data"), ("compute_dtype", "dtype")):
        if saved[key] != current[key]:
            changed[name] = (saved[key], current[key])
    if changed:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise TableFreeError(
            f"cannot resume from {path}: settings that fix the training trajectory changed ({details}); "
            f"restore them, or train into a new out directory"
        )
    step, was, now = saved["step"], saved["total_steps"], current["total_steps"]
    if step > now:
        raise TableFreeError(f"cannot resume from {path}: it is at step {step}, past the {now} steps now set; "
                             f"set max_steps (or tokens) to at least {step}, or train into a new out directory")
    # A new length is accepted when the steps already taken had the same learning rates under it: the
    # resumed run is then a straight run of the new length (wsd before its decay, anything in warmup).
    if was != now and any(learning_rate(cfg, s, was) != learning_rate(cfg, s, now) for s in range(step)):
        raise TableFreeError(
            f"cannot resume from {path}: the length changed from {was} to {now} steps, which changes the {cfg.schedule} "
            f"learning rate of the {step} steps already taken; restore max_steps (or tokens), or train into a new "
            f"out directory (schedule=wsd runs can be lengthened until their decay begins)"
        )


def diverged(step: int, what: str, out: Path, saved_step: int | None) -> TableFreeError:
    kept = (f"the checkpoint of step {saved_step} in {out} is kept, but resuming replays the same steps"
            if saved_step else "no checkpoint was written")
    return TableFreeError(f"training diverged: {what} at step {step}; {kept}; train into a new out directory "
                          f"with a lower lr, a longer warmup_steps or a grad_clip")


def _train(cfg: TrainConfig, config, world, held: contextlib.ExitStack) -> dict:
    """The run; `held` keeps rank 0's lock on cfg.out (the only rank that writes) until the run ends."""
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import (CHECKPOINT, gather_state, load_checkpoint, refuse_legacy_checkpoint, restore_state,
                             rng_states, save_checkpoint, set_rng_states)
    from .data import TokenShards
    from .distributed import all_reduce_sum, on_main, unwrap, wrap_model
    from .evaluate import evaluate_shards, token_byte_lengths
    from .files import claim_output_dir, output_lock, read_json
    from .loss import summed_next_token_loss
    from .metrics import MEASURED_PEAK, MetricsLog, peak_flops, training_flops_per_token
    from .presets import build_model
    from .tokenizer import load_tokenizer, tokenizer_hash

    out = Path(cfg.out)
    total_steps = cfg.steps()
    train_shards = TokenShards(cfg.data, "train")  # before the tokenizer, so missing data is reported as such
    tokenizer = load_tokenizer(cfg.tokenizer or Path(cfg.data) / "tokenizer")
    tok_hash = tokenizer_hash(tokenizer)
    val_shards = TokenShards(cfg.data, "val", expected_tokenizer_hash=tok_hash)  # one manifest: checks both splits
    config = model_config(cfg, tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise TableFreeError(f"the data's tokenizer has {len(tokenizer):,} ids but the model's vocab_size is {config.vocab_size:,}")
    if cfg.batch_size % world.size:
        raise TableFreeError(f"batch_size {cfg.batch_size} is not divisible by the {world.size} processes")
    per_rank = cfg.batch_size // world.size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise TableFreeError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per process")
    dtype = world.runtime.dtype
    autocast = world.runtime.autocast()

    def claim() -> None:
        held.enter_context(output_lock(out, inputs=[cfg.data, cfg.tokenizer]))
        refuse_legacy_checkpoint(out)
        claim_output_dir(out, "train", resumable=True, force=cfg.force, inputs=[cfg.data, cfg.tokenizer],
                         writes=[CHECKPOINT, "metrics.jsonl", "result.json", "model", "tensorboard"])

    on_main(world, claim)
    run = {"model_config": config_fingerprint(config), "tokenizer_hash": tok_hash, "data": data_fingerprint(train_shards),
           "compute_dtype": str(dtype).removeprefix("torch."), "total_steps": total_steps}
    state = load_checkpoint(out / CHECKPOINT)
    if state is not None:
        check_resumable(state, run, cfg, out / CHECKPOINT)
        finished = out / "result.json"
        if state["step"] >= total_steps and finished.is_file() and (out / "model" / "config.json").is_file():
            return read_json(finished, "result of the finished run")  # nothing to redo
    model = build_model(config, seed=cfg.seed).to(world.device)
    input_params = trainable_input_params(model)
    flops_per_token = training_flops_per_token(config, cfg.seq_len)
    model = wrap_model(model, world, cfg.distributed)
    optimizer = build_optimizer(model, cfg, world.device)
    start, saved_step, loss_value = 0, None, float("nan")
    if state is not None:
        restore_state(model, optimizer, state)
        set_rng_states(state["rng"])
        start = saved_step = state["step"]
        loss_value = state["loss"]
        if world.is_main:
            print(f"resuming {out} from its checkpoint at step {start}")
    if world.is_main and cfg.progress:
        print(f"training on {world.runtime.describe()}")
    forward = torch.compile(model) if cfg.compile else model
    peak, peak_source = (cfg.peak_flops, "given") if cfg.peak_flops else peak_flops(world.device, dtype)
    byte_lengths = token_byte_lengths(tokenizer, config.vocab_size)
    log = on_main(world, lambda: MetricsLog(out, enabled=True, resume_step=start)) or MetricsLog(out, enabled=False)

    def checkpoint(step: int, **final) -> None:
        nonlocal saved_step
        model_state, optim_state = gather_state(model, optimizer)

        def write() -> None:
            nonfinite = next((name for name, t in model_state.items() if not torch.isfinite(t).all()), None)
            if nonfinite is not None:
                raise diverged(step, f"the weights of {nonfinite} are not finite", out, saved_step)
            save_checkpoint(out / CHECKPOINT, {"step": step, "loss": loss_value, "model": model_state,
                                               "optimizer": optim_state, "rng": rng_states(),
                                               "train_config": asdict(cfg), **run, **final})

        on_main(world, write)
        saved_step = step

    def validate() -> dict:
        return evaluate_shards(forward, val_shards, cfg.seq_len, cfg.eval_tokens, byte_lengths, world.device, autocast)

    bar = tqdm(total=total_steps, initial=start, desc=f"train {cfg.variant}", disable=not (cfg.progress and world.is_main))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_seconds = 0.0
    model.train()
    for step in range(start, total_steps):
        began = time.perf_counter()
        done = step + 1
        lr = learning_rate(cfg, step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_rows(train_shards, cfg, step)[world.rank * per_rank : (world.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=world.device)
        for first in range(0, per_rank, micro):
            chunk = torch.from_numpy(rows[first : first + micro]).to(world.device)
            last = first + micro >= per_rank
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast:  # the head and cross-entropy a chunk of positions at a time (docs/architecture.md)
                    token_loss = summed_next_token_loss(forward, chunk[:, :-1], chunk[:, 1:])
                # DDP and FSDP average gradients over processes; scale so the result is the global-batch mean.
                (token_loss * world.size / tokens_per_step).backward()
            loss_sum += token_loss.detach()
        loss_value = all_reduce_sum(loss_sum, world).item() / tokens_per_step
        if not math.isfinite(loss_value):  # every rank sees the same reduced loss, so all stop here
            raise diverged(done, f"the loss is {loss_value}", out, saved_step)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - began
        tokens_per_s = (done - start) * tokens_per_step / train_seconds
        mfu = tokens_per_s * flops_per_token / (peak * world.size)
        bar.update(1)
        # MFU is shown against a datasheet peak (a known GPU, or peak_flops given); against this machine's measured
        # matmul rate (a CPU) it would read as a utilisation it is not, so it stays in metrics.jsonl alone.
        shown = {"mfu": f"{mfu:.1%}"} if peak_source != MEASURED_PEAK else {}
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", **shown)
        if done % cfg.log_every == 0 or done == total_steps:
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            log.log(done, loss=loss_value, lr=lr, grad_norm=float(norm), tokens=done * tokens_per_step,
                    tokens_per_s=tokens_per_s, mfu=mfu)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
            log.log(done, **{f"val_{k}": v for k, v in validate().items()})
            model.train()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != total_steps:
            checkpoint(done)
    bar.close()
    # Every row of a step is logged before that step's checkpoint, so a resumed run keeps them and logs none
    # again; the final checkpoint keeps the final validation for a run resumed after it.
    if start < total_steps:
        val = validate()
        log.log(total_steps, **{f"val_{k}": v for k, v in val.items()})
        checkpoint(total_steps, final_val=val)
    elif "final_val" in state:
        val = state["final_val"]
    else:  # a final checkpoint of an earlier version, written before its validation
        val = validate()
        log.log(total_steps, **{f"val_{k}": v for k, v in val.items()})
    result = {
        "size": cfg.size, "variant": cfg.variant, "seed": cfg.seed, "data_seed": cfg.data_seed,
        "steps": total_steps, "tokens": total_steps * tokens_per_step, "train_loss": loss_value,
        "val_loss": val["loss"], "val_ppl": val["ppl"], "val_bits_per_byte": val["bits_per_byte"],
        "trainable_input_params": input_params,
        "parameters": sum(p.numel() for p in unwrap(model).parameters()),
        "tokens_per_s": (total_steps - start) * tokens_per_step / train_seconds if train_seconds else None,
        "peak_flops": peak, "peak_flops_source": peak_source, "world_size": world.size,
    }
    log.close()
    model_state = gather_state(model, optimizer)[0] if cfg.save_model else None

    def finish() -> None:
        if model_state is not None:
            _save_final(model_state, config, cfg, tokenizer, out)
        write_json(out / "result.json", result)

    on_main(world, finish)
    return result


def _save_final(model_state: dict, config, cfg: TrainConfig, tokenizer, out: Path) -> None:
    """The trained model in the Hugging Face form (gathered from the shards under FSDP)."""
    from .hub import save_model
    from .presets import build_model

    final = build_model(config, seed=cfg.seed)
    final.load_state_dict(model_state)
    tokenizer.model_max_length = config.max_position_embeddings
    save_model(final.eval(), out / "model", tokenizer)


def _shown(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def train_command(args) -> int:
    from .presets import parse_overrides
    from .runtime import process_rank

    overrides = parse_overrides(args.overrides)
    if args.force:
        overrides["force"] = True
    cfg = read_train_config(args.config, overrides)
    result = train(cfg)
    if process_rank().is_main:
        print(
            f"{result['size']}-{result['variant']}: val loss {_shown(result['val_loss'], '.4f')}, "
            f"ppl {_shown(result['val_ppl'], '.2f')}, {_shown(result['val_bits_per_byte'], '.3f')} bits/byte "
            f"-> {Path(cfg.out) / 'model'}"
        )
    return 0


def settings_help() -> str:
    """Every TrainConfig field with its default and meaning, for `tablefree train --help`."""
    import textwrap

    import yaml

    lines = [f"settings {WHERE_SETTINGS_GO}:"]
    for spec in fields(TrainConfig):
        default = spec.default_factory() if spec.default is MISSING else spec.default
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
        lines.append(f"  {spec.name}={shown}")
        lines += textwrap.wrap(spec.metadata["help"], width=90, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines.append("  preset=SIZE-VARIANT")
    lines.append("      short for size=SIZE variant=VARIANT (e.g. preset=tiny-affine)")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    train_parser = subparsers.add_parser("train", epilog=settings_help())
    train_parser.add_argument("--config", help="YAML file of settings that differ from the defaults (see configs/)")
    train_parser.add_argument("--force", action="store_true", help="the same as force=true")
    train_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                              help="settings (listed below); model fields as model.KEY=value")
    train_parser.set_defaults(run=train_command)
