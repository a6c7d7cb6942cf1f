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
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TableFreeError

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    data: str = "runs/data"  # a directory made by `tablefree data prepare`
    tokenizer: str | None = None  # the model's tokenizer (default: the one the data was prepared with)
    out: str = "runs/train"
    preset: str = "small-affine"  # see `tablefree new --help`
    variant: str | None = None  # switch the preset's input interface: learned, minimal, affine, gray, hashed
    model: dict = field(default_factory=dict)  # model-field overrides, e.g. {hidden_size: 128}
    seed: int = 0  # model seed: initialisation depends on it alone
    data_seed: int = 0  # data order depends on it alone
    seq_len: int = 256
    batch_size: int = 32  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward pass per process (default: all of this rank's)
    max_steps: int | None = None
    tokens: int | None = None  # alternative to max_steps: train tokens (steps = tokens / (batch_size * seq_len))
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine, or wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: only at the end
    eval_tokens: int = 65536
    checkpoint_every: int = 200  # 0: only at the end
    log_every: int = 10
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 autocast on GPU, float32 on CPU
    compile: bool = False
    distributed: str = "auto"  # auto (ddp under torchrun), none, ddp, fsdp
    progress: bool = True
    peak_flops: float | None = None  # MFU denominator; default: GPU datasheet or measured CPU matmul rate
    save_model: bool = True

    def steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.tokens is not None:
            return max(1, self.tokens // (self.batch_size * self.seq_len))
        raise TableFreeError("set max_steps or tokens in the training config")


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """A TrainConfig from YAML plus `key=value` overrides (`model.hidden_size=64` for model fields)."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TableFreeError(f"no config file at {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TableFreeError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise TableFreeError(f"{path} must hold a mapping of training settings")
    values = {**values, "model": dict(values.get("model") or {})}
    for key, value in overrides.items():
        if key.startswith("model."):
            values["model"][key[len("model."):]] = value
        else:
            values[key] = value
    return make_config(values, where=str(path) if path else "the command line")


def make_config(values: dict, where: str = "the config") -> TrainConfig:
    known = {f.name: f for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise TableFreeError(f"unknown training setting {key!r} in {where}{hint}")
    config = TrainConfig(**{k: _coerce(known[k], v, where) for k, v in values.items()})
    for name, choices in (("schedule", SCHEDULES), ("dtype", DTYPES)):
        if getattr(config, name) not in choices:
            raise TableFreeError(f"{name} {getattr(config, name)!r} is not one of {', '.join(choices)}")
    for name in ("seq_len", "batch_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise TableFreeError(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    return config


def _coerce(spec, value, where: str):
    """YAML reads `1e-3` as a string and `3` as an int; give each setting its declared type."""
    kinds = str(spec.type)
    if value is None or isinstance(value, bool) or "dict" in kinds:
        return value
    try:
        if "float" in kinds and isinstance(value, (int, float, str)):
            return float(value)
        if "int" in kinds and isinstance(value, (int, float, str)) and float(value) == int(float(value)):
            return int(float(value))
    except ValueError:
        raise TableFreeError(f"setting {spec.name!r} in {where} expects {kinds}, got {value!r}") from None
    return value


def model_config(cfg: TrainConfig):
    from .presets import build_config

    overrides = dict(cfg.model)
    if cfg.variant is not None:
        overrides["variant"] = cfg.variant
    config = build_config(cfg.preset, **overrides)
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
    counts = shards.window_starts(cfg.seq_len + 1)
    rng = np.random.Generator(np.random.PCG64([cfg.data_seed, step]))
    return shards.windows(rng.integers(0, int(counts.sum()), size=cfg.batch_size), cfg.seq_len + 1)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
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

    world = init_world(cfg.device)
    try:
        return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world) -> dict:
    from tqdm.auto import tqdm

    from .checkpoint import CHECKPOINT, check_same_model, gather_state, load_checkpoint, restore_state, rng_states, save_checkpoint, set_rng_states
    from .data import TokenShards
    from .distributed import all_reduce_sum, barrier, unwrap, wrap_model
    from .evaluate import evaluate_shards, token_byte_lengths
    from .metrics import MetricsLog, peak_flops, training_flops_per_token
    from .presets import build_model, variant_of
    from .tokenizer import load_tokenizer, tokenizer_hash

    out = Path(cfg.out)
    config = model_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or Path(cfg.data) / "tokenizer")
    tok_hash = tokenizer_hash(tokenizer)
    train_shards = TokenShards(cfg.data, "train", expected_tokenizer_hash=tok_hash)
    val_shards = TokenShards(cfg.data, "val", expected_tokenizer_hash=tok_hash)
    if len(tokenizer) > config.vocab_size:
        raise TableFreeError(f"the data's tokenizer has {len(tokenizer):,} ids but the model's vocab_size is {config.vocab_size:,}")
    if cfg.batch_size % world.size:
        raise TableFreeError(f"batch_size {cfg.batch_size} is not divisible by the {world.size} processes")
    per_rank = cfg.batch_size // world.size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise TableFreeError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per process")
    total_steps = cfg.steps()
    dtype = {"auto": torch.bfloat16 if world.device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = (torch.autocast(world.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    fingerprint = config_fingerprint(config)
    state = load_checkpoint(out / CHECKPOINT)
    if state is not None:
        check_same_model(state["model_config"], fingerprint, out / CHECKPOINT)
        if state["tokenizer_hash"] != tok_hash:
            raise TableFreeError(f"cannot resume from {out / CHECKPOINT}: it was trained on data of tokenizer {state['tokenizer_hash']}, not {tok_hash}")
        finished = out / "result.json"
        if state["step"] >= total_steps and finished.is_file() and (out / "model" / "config.json").is_file():
            return json.loads(finished.read_text())  # already trained to the end: nothing to redo
    model = build_model(config, seed=cfg.seed).to(world.device)
    input_params = trainable_input_params(model)
    flops_per_token = training_flops_per_token(config, cfg.seq_len)
    model = wrap_model(model, world, cfg.distributed)
    optimizer = build_optimizer(model, cfg, world.device)
    start = 0
    if state is not None:
        restore_state(model, optimizer, state)
        set_rng_states(state["rng"])
        start = state["step"]
    forward = torch.compile(model) if cfg.compile else model
    peak, peak_source = (cfg.peak_flops, "given") if cfg.peak_flops else peak_flops(world.device, dtype)
    byte_lengths = token_byte_lengths(tokenizer, config.vocab_size)
    log = MetricsLog(out, enabled=world.is_main, resume_step=start)

    def checkpoint(step: int) -> None:
        model_state, optim_state = gather_state(model, optimizer)
        if world.is_main:
            save_checkpoint(out / CHECKPOINT, {
                "step": step, "model": model_state, "optimizer": optim_state, "rng": rng_states(),
                "model_config": fingerprint, "tokenizer_hash": tok_hash, "train_config": asdict(cfg),
            })
        barrier(world)

    def validate() -> dict:
        return evaluate_shards(forward, val_shards, cfg.seq_len, cfg.eval_tokens, byte_lengths, world.device, autocast)

    bar = tqdm(total=total_steps, initial=start, desc=f"train {variant_of(config)}", disable=not (cfg.progress and world.is_main))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_seconds, loss_value = 0.0, float("nan")
    model.train()
    for step in range(start, total_steps):
        began = time.perf_counter()
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
                with autocast:
                    logits = forward(input_ids=chunk[:, :-1]).logits
                token_loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
                # DDP and FSDP average gradients over processes; scale so the result is the global-batch mean.
                (token_loss * world.size / tokens_per_step).backward()
            loss_sum += token_loss.detach()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.zeros(())
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = all_reduce_sum(loss_sum, world).item() / tokens_per_step
        train_seconds += time.perf_counter() - began
        done = step + 1
        tokens_per_s = (done - start) * tokens_per_step / train_seconds
        mfu = tokens_per_s * flops_per_token / (peak * world.size)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
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
    if start < total_steps:
        checkpoint(total_steps)
    val = validate()
    result = {
        "variant": variant_of(config), "preset": cfg.preset, "seed": cfg.seed, "data_seed": cfg.data_seed,
        "steps": total_steps, "tokens": total_steps * tokens_per_step, "train_loss": loss_value,
        "val_loss": val["loss"], "val_ppl": val["ppl"], "val_bits_per_byte": val["bits_per_byte"],
        "trainable_input_params": input_params,
        "parameters": sum(p.numel() for p in unwrap(model).parameters()),
        "tokens_per_s": (total_steps - start) * tokens_per_step / train_seconds if train_seconds else None,
        "peak_flops": peak, "peak_flops_source": peak_source, "world_size": world.size,
    }
    log.log(total_steps, **{f"val_{k}": v for k, v in val.items()})
    log.close()
    if cfg.save_model:
        _save_final(model, optimizer, config, cfg, tokenizer, out, world)
    if world.is_main:
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    barrier(world)
    return result


def _save_final(model, optimizer, config, cfg: TrainConfig, tokenizer, out: Path, world) -> None:
    """The trained model in the Hugging Face form (gathered from the shards under FSDP)."""
    from .checkpoint import gather_state
    from .hub import save_model
    from .presets import build_model

    model_state, _ = gather_state(model, optimizer)
    if not world.is_main:
        return
    final = build_model(config, seed=cfg.seed)
    final.load_state_dict(model_state)
    tokenizer.model_max_length = config.max_position_embeddings
    save_model(final.eval(), out / "model", tokenizer)


def train_command(args) -> int:
    from .presets import parse_overrides

    cfg = load_config(args.config, parse_overrides(args.overrides))
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"{result['variant']}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}, "
            f"{result['val_bits_per_byte']:.3f} bits/byte -> {Path(cfg.out) / 'model'}"
        )
    return 0


def add_cli(subparsers) -> None:
    train_parser = subparsers.add_parser("train", help="train a model on prepared data (CPU, or GPUs via torchrun)")
    train_parser.add_argument("--config", help="YAML training config (see configs/)")
    train_parser.add_argument("overrides", nargs="*", help="settings as key=value; model fields as model.KEY=value")
    train_parser.set_defaults(run=train_command)
