"""Training checkpoints: model, optimizer, step (which fixes schedule and data position), RNG states.

One file, `checkpoint.pt`, replaced atomically: written to a temporary file, fsynced, then renamed,
so a crash or a full disk mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from .errors import TableFreeError

CHECKPOINT = "checkpoint.pt"


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; every rank must call this under FSDP."""
    from .distributed import unwrap

    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def restore_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from .distributed import unwrap

    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically; on any failure the old file stays and the error says so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint exists"
        reason = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
        raise TableFreeError(f"could not write the checkpoint at step {payload.get('step')}: {reason}; {kept}") from None


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise TableFreeError(f"the checkpoint {path} cannot be read ({exc}); delete it to start over") from None


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume when the model config changed: the weights would not mean the same thing."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise TableFreeError(
            f"cannot resume from {path}: the model config changed ({details}); "
            f"restore the original settings or train into a new out directory"
        )
