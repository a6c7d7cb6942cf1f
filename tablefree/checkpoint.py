"""Training checkpoints: model, optimizer, step (which fixes schedule and data position), RNG states.

One file, `checkpoint.safetensors`, with no pickle anywhere: every tensor (model, optimizer state,
RNG states) is a safetensors tensor; everything else (step, settings, the optimizer's param_groups,
where each tensor belongs) is JSON in the file's metadata, beside the SHA-256 of every tensor's bytes,
verified on load. The file is written in a temporary directory of ours, fsynced, then renamed over
the previous checkpoint: a kill or a full disk mid-write leaves the previous checkpoint intact, and
the next run removes the leftover directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import TableFreeError
from .files import new_temporary_dir, normal_permissions, refuse_symlink, write_error

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickle format of earlier versions: refused, never unpickled
METADATA_KEY = "tablefree.checkpoint"
FORMAT = 1


def _state_dict_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on the CPU; every rank must call this under FSDP.

    Keyed by parameter name for every strategy (none, DDP, FSDP), so a run may resume under another one.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))


def restore_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_dict_options())


def _encode(value, path: str, tensors: dict[str, torch.Tensor], storages: set[int]):
    """`value` as JSON, each tensor replaced by a reference to its entry in `tensors` (named by its path)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()  # tied weights share storage, which safetensors refuses
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[path] = tensor
        return {"tensor": path}
    if isinstance(value, dict):  # as pairs, so integer keys (optimizer state ids) stay integers
        return {"dict": [[key, _encode(item, _child(path, key), tensors, storages)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, _child(path, i), tensors, storages) for i, item in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} (at {path})")


def _child(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    (tag, inner), = value.items()
    if tag == "tensor":
        return tensors[inner]
    if tag == "dict":
        return {key: _decode(item, tensors) for key, item in inner}
    if tag == "tuple":
        return tuple(_decode(item, tensors) for item in inner)
    if tag == "float":
        return float(inner)
    raise ValueError(f"unknown entry {tag!r} in the checkpoint's structure")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` (nested dicts/lists of tensors and JSON values) to `path` atomically.

    On any failure the previous checkpoint stays, and the error says so.
    """
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(payload, "", tensors, set())
    header = json.dumps({"format": FORMAT, "structure": structure, "sha256": {name: _digest(t) for name, t in tensors.items()}})
    # The header's own checksum: a damaged number in it (a learning rate, a step) is caught as well.
    metadata = {METADATA_KEY: header, f"{METADATA_KEY}.sha256": hashlib.sha256(header.encode()).hexdigest()}
    refuse_symlink(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # safetensors stages its own temporary beside the file it writes: keep that inside a directory of ours.
        staging = new_temporary_dir(path)
        written = staging / path.name
        save_file(tensors, written, metadata=metadata)
        normal_permissions(staging)  # safetensors writes 0600; the umask decides, as for every file we write
        with open(written, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(written, path)
    except (OSError, SafetensorError) as exc:
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint exists"
        raise write_error(f"the checkpoint at step {payload.get('step')}", exc, f"; {kept}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def refuse_legacy_checkpoint(out: Path) -> None:
    legacy = out / LEGACY_CHECKPOINT
    if legacy.exists():
        raise TableFreeError(
            f"{legacy} is a checkpoint in the pickle format of earlier versions, which tablefree no longer loads "
            f"(unpickling a file can run any code in it); train into a new out directory, or delete {legacy} "
            f"to restart this one from step 0"
        )


def load_checkpoint(path: Path) -> dict | None:
    """The payload saved at `path` (None when there is none), every tensor checked against its recorded SHA-256."""
    if not path.exists():
        return None
    what_to_do = f"delete {path} to restart this run from step 0, or train into a new out directory"

    def damaged(problem: str) -> TableFreeError:
        return TableFreeError(f"the checkpoint {path} is damaged: {problem}; {what_to_do}")

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            text = metadata.get(METADATA_KEY)
            if text is None:
                raise TableFreeError(f"{path} is not a tablefree training checkpoint (its metadata has no {METADATA_KEY}); {what_to_do}")
            if hashlib.sha256(text.encode()).hexdigest() != metadata.get(f"{METADATA_KEY}.sha256"):
                raise damaged("its header differs from the checksum recorded when it was written")
            header = json.loads(text)
            if header["format"] != FORMAT:
                raise TableFreeError(f"the checkpoint {path} has format {header['format']!r}, this version reads {FORMAT}; {what_to_do}")
            sums, names = header["sha256"], set(handle.keys())
            odd = sorted(set(sums) ^ names)
            if odd:
                raise damaged(f"tensor {odd[0]!r} is {'missing' if odd[0] in sums else 'unexpected'}")
            tensors = {}
            for name in sorted(names):
                tensors[name] = handle.get_tensor(name)
                if _digest(tensors[name]) != sums[name]:
                    raise damaged(f"the bytes of tensor {name!r} differ from the checksum recorded when it was written")
        return _decode(header["structure"], tensors)
    except TableFreeError:
        raise
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # a damaged file surfaces as any of these, from safetensors' parser or from ours
        raise TableFreeError(f"the checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); {what_to_do}") from None


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume when the model config changed: the weights would not mean the same thing."""
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise TableFreeError(
            f"cannot resume from {path}: the model config changed ({details}); "
            f"restore the original settings or train into a new out directory"
        )
