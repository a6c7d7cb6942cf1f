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
from transformers import GenerationConfig, PretrainedConfig

from .configuration_tablefree import TableFreeConfig
from .errors import TableFreeError, summary
from .files import read_marker, staged_directory

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
    with staged_directory(out, MODEL_KIND) as stage:  # a refused write (a full disk) becomes one WriteError there
        _write_model_files(model, stage.path, tokenizer)
        stage.extra["sha256"] = {p.name: file_sha256(p) for p in sorted(stage.path.glob("*.safetensors"))}
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
    """The model config of a directory, checked by the rules of a new one (presets.check_config_values) before
    anything is built. Code in the directory never runs: transformers is told so, and so never asks."""
    from transformers import AutoConfig

    from . import register_auto_classes
    from .presets import check_config_values, checked_config, config_errors

    register_auto_classes()  # the package's own model type loads without remote code
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TableFreeError(f"{path} has no config.json; is it a model directory?")
    values = read_json_object(config_file, "model config")
    _refuse_config_code(config_file, values)
    check_config_values(values)
    with config_errors():
        return checked_config(AutoConfig.from_pretrained(str(path), trust_remote_code=False))


def read_json_object(file: Path, what: str) -> dict:
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting past the parser's depth
        raise TableFreeError(f"{file} is not valid JSON: {summary(exc, typed=isinstance(exc, RecursionError))}") from None
    if not isinstance(values, dict):
        raise TableFreeError(f"{file} holds a JSON {type(values).__name__}, not the object a {what} is")
    return values


def remote_code_error(file: Path, ref, reason: str) -> TableFreeError:
    """The refusal of code a model directory asks transformers to import: the one answer, whatever the command."""
    return TableFreeError(
        f"{file} asks to run code from its directory ({repr(ref)[:80]}): {reason}; tablefree never runs a model "
        f"directory's code unless you pass --trust-remote-code (tablefree serve), where you trust the files"
    )


def _refuse_config_code(config_file: Path, values: dict) -> None:
    """A model type transformers (or this package) knows loads with its own classes; any other needs the directory's."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = values.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    auto_map = values.get("auto_map")
    ref = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else auto_map
    if model_type is None:
        reason = 'it names no model_type (a tablefree model\'s is "tablefree")'
    else:
        reason = f"its model_type {repr(model_type)[:80]} is not one transformers {transformers_version} or tablefree knows"
    if ref:
        raise remote_code_error(config_file, ref, reason)
    raise TableFreeError(f"{config_file} is no model config tablefree can load: {reason}")


def causal_lm_class(config: PretrainedConfig, path: Path):
    """The class transformers (or this package) has for the causal LM of `config`; the directory's own is refused."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        reason = f"model type {config.model_type!r} has no causal LM class in transformers or tablefree"
        auto_map = getattr(config, "auto_map", None)
        ref = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else auto_map
        if ref:
            raise remote_code_error(path / "config.json", ref, reason) from None
        raise TableFreeError(f"{path} holds no causal language model: {reason}") from None


def refuse_tokenizer_code(path: Path) -> None:
    """A tokenizer_config.json whose auto_map names code in the directory loads only if transformers has the class."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return
    values = read_json_object(config_file, "tokenizer config")
    auto_map = values.get("auto_map")
    ref = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if not ref:
        return
    name = values.get("tokenizer_class")
    base = name.removesuffix("Fast") if isinstance(name, str) else None
    if base and (tokenizer_class_from_name(base) or tokenizer_class_from_name(base + "Fast")):
        return  # transformers' own class is used and the directory's code is not imported
    raise remote_code_error(config_file, ref, f"its tokenizer_class {repr(name)[:80]} is not one transformers knows")


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

    from .presets import check_fits
    from .tokenizer import load_tokenizer

    path = resolve_model_path(name)
    config = load_config(path)
    cls = causal_lm_class(config, path)
    try:
        check_fits(cls, config, dtype)
    except (RuntimeError, MemoryError) as exc:  # shapes past torch's limits, or more weights than memory
        raise TableFreeError(f"cannot load the model in {path}: {summary(exc)}") from None
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
                                                           use_safetensors=True, output_loading_info=True,
                                                           trust_remote_code=False)
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
