"""The Hugging Face model directory: save it self-contained, load it from a path or the local cache.

A saved table-free model carries config.json (with `auto_map`), model.safetensors, the three source
files its classes live in (codes.py, configuration_tablefree.py, modeling_tablefree.py),
generation_config.json and the tokenizer, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where this package is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from .configuration_tablefree import TableFreeConfig
from .errors import TableFreeError

SOURCE_FILES = ("codes.py", "configuration_tablefree.py", "modeling_tablefree.py")
AUTO_MAP = {
    "AutoConfig": "configuration_tablefree.TableFreeConfig",
    "AutoModel": "modeling_tablefree.TableFreeModel",
    "AutoModelForCausalLM": "modeling_tablefree.TableFreeForCausalLM",
}
WEIGHTS_NAME = "model.safetensors"


def replace_directory(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing `out` is only removed once `tmp` is complete."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write the self-contained model directory atomically (a half-written directory never replaces a good one)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
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
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    """(model, tokenizer or None) from a directory or a cached hub id, with clear errors for broken ones."""
    from transformers import AutoModelForCausalLM

    from .tokenizer import load_tokenizer

    path = resolve_model_path(name)
    config = load_config(path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TableFreeError(f"{path} has no weights file (expected {WEIGHTS_NAME})")
    _check_safetensors(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype or torch.float32)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise TableFreeError(f"could not load the weights in {path}: {str(exc).splitlines()[0]}") from None
    if device:
        model.to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        tokenizer = load_tokenizer(path)
        check_tokenizer(tokenizer, config, str(path))
    return model, tokenizer


def _check_safetensors(path: Path) -> None:
    """Open each safetensors file's header so truncation or corruption is named before loading."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise TableFreeError(f"the weights file {file} is corrupted or truncated ({exc}); save or export it again") from None
