"""The Hugging Face model directory: save it self-contained, load it from a path or the local cache.

A saved table-free model carries config.json (with `auto_map`), model.safetensors, the three source
files its classes live in (codes.py, configuration_tablefree.py, modeling_tablefree.py),
generation_config.json and the tokenizer, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where this package is not installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import GenerationConfig, PretrainedConfig

from .configuration_tablefree import TableFreeConfig
from .errors import TableFreeError, summary
from .files import read_marker, staged_directory, write_error

SOURCE_FILES = ("codes.py", "configuration_tablefree.py", "modeling_tablefree.py")
AUTO_MAP = {
    "AutoConfig": "configuration_tablefree.TableFreeConfig",
    "AutoModel": "modeling_tablefree.TableFreeModel",
    "AutoModelForCausalLM": "modeling_tablefree.TableFreeForCausalLM",
}
WEIGHTS_NAME = "model.safetensors"
MODEL_KIND = "model"  # the kind of output directory files.claim_output_dir and install_directory see


def save_model(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write the self-contained model directory, then move it into place (files.install_directory).

    The weights' SHA-256 go into the directory's marker and are verified by `load_model`. Callers
    decide whether `out_dir` may be written (files.claim_output_dir); files tablefree did not write
    there are never removed or overwritten.
    """
    out = Path(out_dir)
    try:
        with staged_directory(out, MODEL_KIND) as stage:
            _write_model_files(model, stage.path, tokenizer)
            stage.extra["sha256"] = {p.name: file_sha256(p) for p in sorted(stage.path.glob("*.safetensors"))}
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        raise write_error(f"the model to {out}", exc) from None
    return out


def _write_model_files(model, tmp: Path, tokenizer) -> None:
    """The model directory's files, written into `tmp`."""
    config = model.config
    if isinstance(config, TableFreeConfig):
        config.auto_map = dict(AUTO_MAP)
    config.architectures = [type(model).__name__]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(tmp))
    if isinstance(config, TableFreeConfig):
        here = Path(__file__).parent
        for name in SOURCE_FILES:
            shutil.copyfile(here / name, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model_path(name: str | Path) -> Path:
    """A model directory, or a hub id found in the local Hugging Face cache (never the network)."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise TableFreeError(f"{name} is a file; a model is a directory with config.json and model.safetensors")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError, ValueError):
        raise TableFreeError(
            f"no model at {name}: not a directory, and not a hub id in the local Hugging Face cache "
            f"(models are never downloaded at run time; put it in the cache or pass a directory)"
        ) from None


def load_config(path: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    from . import register_auto_classes

    register_auto_classes()  # the package's own model type loads without remote code
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TableFreeError(f"{path} has no config.json; is it a model directory?")
    try:
        json.loads(config_file.read_text())
        return AutoConfig.from_pretrained(str(path))
    except json.JSONDecodeError as exc:
        raise TableFreeError(f"{config_file} is not valid JSON: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        cause = exc.__cause__ or exc
        raise TableFreeError(f"invalid model config in {config_file}: {cause}") from None


def check_tokenizer(tokenizer, config: PretrainedConfig, where: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise TableFreeError(
            f"the tokenizer in {where} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}: use the tokenizer the model was built with"
        )


def load_model(name: str | Path, dtype: torch.dtype | None = None, device: str | None = None, with_tokenizer: bool = True):
    """(model, tokenizer or None) from a directory or a cached hub id, checked before and after loading.

    Only safetensors are read (pickle weights can run code). Checksums recorded by `save_model` are
    verified; a missing, unexpected or wrongly shaped tensor and any non-finite weight are errors.
    """
    from transformers import AutoModelForCausalLM

    from .tokenizer import load_tokenizer

    path = resolve_model_path(name)
    config = load_config(path)
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise TableFreeError(
                f"{path} holds only pickle weights (pytorch_model.bin), which can run code when loaded, so tablefree "
                f"does not read them; convert them once, where you trust the file, with transformers: "
                f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes {WEIGHTS_NAME}"
            )
        raise TableFreeError(f"{path} has no weights file (expected {WEIGHTS_NAME})")
    _check_safetensors(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype or torch.float32,
                                                           use_safetensors=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise TableFreeError(f"could not load the weights in {path}: {summary(exc)}") from None
    _check_loaded(model, info, path)
    if device:
        model.to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        tokenizer = load_tokenizer(path)
        check_tokenizer(tokenizer, config, str(path))
    return model, tokenizer


def _check_safetensors(path: Path) -> None:
    """Open each file's header (truncation, damage), then verify the checksum recorded at save time, before loading."""
    from safetensors import safe_open

    marker = read_marker(path) or {}
    recorded = marker.get("sha256") if isinstance(marker.get("sha256"), dict) else {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise TableFreeError(f"the weights file {file} is corrupted or truncated ({exc}); save or export it again") from None
        expected = recorded.get(file.name)
        if expected is not None and file_sha256(file) != expected:
            raise TableFreeError(f"the weights file {file} does not match the checksum recorded when it was saved: "
                                 f"it was changed or damaged; save or export the model again")


def _check_loaded(model, info: dict, path: Path) -> None:
    """Every tensor present, expected and of the right shape; every weight finite."""
    for kind, what in (("missing_keys", "is missing"), ("unexpected_keys", "is not part of this model"),
                       ("mismatched_keys", "has the wrong shape")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or [])
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise TableFreeError(f"the weights in {path}: tensor {keys[0]} {what}{more}; the directory is incomplete or "
                                 f"belongs to another model: save or export it again")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TableFreeError(f"the weights in {path}: tensor {name} holds non-finite values (NaN or infinity); "
                                 f"the model is damaged or diverged in training")
