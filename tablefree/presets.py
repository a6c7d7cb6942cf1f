"""Named model presets: a size (depth, width, context) times an input interface (variant).

A preset name is `SIZE-VARIANT`: `paper-learned`, `paper-minimal`, `paper-affine` are the three
models of the paper; `tiny-*` and `small-*` are CPU sizes. The size and the variant stay two separate
choices everywhere (a training config has `size` and `variant`); nothing re-derives one from a model
config. Sizes derive from depth and width alone (head size 32, MLP 4x), as in the paper's 32 x 1024
backbone. Every field can be overridden.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .errors import TableFreeError, summary
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

if TYPE_CHECKING:  # torch and transformers load when a model is built, so `tablefree --help` stays light
    import torch
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Size:
    depth: int
    width: int
    context: int

    def backbone(self) -> dict:
        return dict(
            num_hidden_layers=self.depth,
            hidden_size=self.width,
            num_attention_heads=max(1, self.width // 32),
            intermediate_size=4 * self.width,
            max_position_embeddings=self.context,
        )


SIZES = {"paper": Size(32, 1024, 1024), "small": Size(4, 256, 512), "tiny": Size(2, 64, 256)}
# variant -> the fields that choose its input interface; `learned` is stock GPT-NeoX.
VARIANTS = {
    "learned": None,
    "minimal": {"code_family": "minimal"},
    "affine": {"code_family": "affine"},
    "gray": {"code_family": "affine", "affine_preset": "gray"},
    "hashed": {"code_family": "hashed"},
}
PRESETS = [f"{size}-{variant}" for size in SIZES for variant in VARIANTS]

# Exactly GPT-NeoX with a sequential residual and full rotary, as the paper's backbone.
BACKBONE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_act="gelu",
    use_parallel_residual=False,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def _config_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def split_preset(preset: str) -> tuple[str, str]:
    """(size, variant) of a preset name `SIZE-VARIANT`."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TableFreeError(f"unknown preset {preset!r}{hint}; choose one of {', '.join(PRESETS)}")
    size, variant = preset.split("-", 1)
    return size, variant


def build_config(preset: str, /, **overrides) -> PretrainedConfig:
    """The config of the preset `SIZE-VARIANT` with model-field `overrides` applied."""
    return sized_config(*split_preset(preset), **overrides)


def sized_config(size: str, variant: str, /, **overrides) -> PretrainedConfig:
    """The model config of a size and an input-interface variant, with model-field `overrides` applied."""
    from transformers import GPTNeoXConfig

    from .configuration_tablefree import TableFreeConfig

    if size not in SIZES:
        raise TableFreeError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if variant not in VARIANTS:
        raise TableFreeError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if "variant" in overrides:
        raise TableFreeError("variant is not a model field: choose it in the preset name (SIZE-VARIANT) "
                             "or as the training setting variant=...")
    cls = GPTNeoXConfig if variant == "learned" else TableFreeConfig
    known = _config_fields(cls)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TableFreeError(f"unknown model field {key!r} for the {variant} variant{hint}")
    values = {**BACKBONE, **SIZES[size].backbone(), **(VARIANTS[variant] or {}), **overrides}
    return instantiate_config(cls, values)


# Sizes that must be positive integers; the config classes check types but accept 0 and negatives.
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings")
LARGEST_SIZE = 2**31 - 1  # torch's shape arithmetic overflows past 64-bit products; no real model comes near
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
DROPOUT_FIELDS = ("hidden_dropout", "attention_dropout", "classifier_dropout")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "float64")
LARGEST_CODE_SCALE = 1e4  # past it the first LayerNorm's sum of squares leaves float16's range


def finite_number(value) -> bool:
    """An int or float (not a bool) that is finite: what a numeric config field may hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config_values(values: dict) -> None:
    """The rules every model config meets, new (`tablefree new`) or loaded from a directory (hub.load_config).

    They cover what the config classes' own type checks let through (zero, negative and huge sizes, names
    that are not choices, numbers the model cannot run with); a field left out takes the class default.
    """
    from transformers.activations import ACT2FN

    from .codes import CODE_FAMILIES

    def refuse(message: str):
        raise TableFreeError(f"invalid model config: {message}")

    for name in POSITIVE_FIELDS:
        value = values.get(name)
        if name in values and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LARGEST_SIZE):
            refuse(f"{name} must be a positive integer up to {LARGEST_SIZE:,}, got {value!r}")
    if "hidden_act" in values and not (isinstance(values["hidden_act"], str) and values["hidden_act"] in ACT2FN):
        refuse(f"hidden_act {values['hidden_act']!r} is not one of {', '.join(sorted(ACT2FN))}")
    width, heads = values.get("hidden_size"), values.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        refuse(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    if "code_family" in values and not (isinstance(values["code_family"], str) and values["code_family"] in CODE_FAMILIES):
        raise TableFreeError(f"unknown code family {values['code_family']!r}; choose one of {', '.join(CODE_FAMILIES)}")
    scale = values.get("code_scale", 1.0)
    if not finite_number(scale) or scale == 0 or abs(scale) > LARGEST_CODE_SCALE:
        refuse(f"code_scale must be a finite non-zero number of magnitude at most {LARGEST_CODE_SCALE:g}, got {scale!r}")
    eps = values.get("layer_norm_eps", 1e-5)
    if not finite_number(eps) or not 0 < eps <= 1:
        refuse(f"layer_norm_eps must be a number in (0, 1], got {eps!r}")
    for name in DROPOUT_FIELDS:
        if values.get(name) is not None and not (finite_number(values[name]) and 0 <= values[name] <= 1):
            refuse(f"{name} must be a probability in [0, 1], got {values[name]!r}")
    for name in ("dtype", "torch_dtype"):  # transformers reads the second as the first
        if values.get(name) is not None and values[name] not in WEIGHT_DTYPES:
            refuse(f"{name} {values[name]!r} is not one of {', '.join(WEIGHT_DTYPES)} (or null)")
    vocab = values.get("vocab_size")
    for name in TOKEN_ID_FIELDS:
        value = values.get(name)
        ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (vocab or 2**63)
                                         for i in ids):
            refuse(f"{name} must be a token id below vocab_size {vocab} (or null), got {value!r}")
    if "rope_parameters" in values:
        check_rope(values["rope_parameters"], width, heads)


def check_rope(rope, width, heads) -> None:
    """Rotary embeddings as the backbone has them: the default kind, a positive base, an even number of rotated dims."""
    if not isinstance(rope, dict):
        raise TableFreeError(f"invalid model config: rope_parameters must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise TableFreeError(f"invalid model config: rope_type {kind!r} is not supported; the GPT-NeoX backbone's "
                             f"rotary embeddings are 'default'")
    theta, factor = rope.get("rope_theta", 10_000.0), rope.get("partial_rotary_factor", 1.0)
    if not finite_number(theta) or not theta > 1:
        raise TableFreeError(f"invalid model config: rope_theta must be a finite number above 1, got {theta!r}")
    if not finite_number(factor) or not 0 < factor <= 1:
        raise TableFreeError(f"invalid model config: partial_rotary_factor must be in (0, 1], got {factor!r}")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0:
        rotated = int(width // heads * factor)
        if rotated < 2 or rotated % 2:
            raise TableFreeError(f"invalid model config: partial_rotary_factor {factor} rotates {rotated} of a head's "
                                 f"{width // heads} dimensions; rotary embeddings need an even number, at least 2")


def instantiate_config(cls, values: dict) -> PretrainedConfig:
    """Instantiate a config class, turning every validation failure into a TableFreeError."""
    check_config_values(values)
    with config_errors():
        return checked_config(cls(**values))


def checked_config(config: PretrainedConfig) -> PretrainedConfig:
    """`config` once its code (for a table-free model) is known to be buildable at its width."""
    from .configuration_tablefree import TableFreeConfig

    if isinstance(config, TableFreeConfig):
        from .modeling_tablefree import build_code_lift

        build_code_lift(config)  # width/layout checks need hidden_size as well as the code
    return config


@contextlib.contextmanager
def config_errors():
    """Every way a config class or the code refuses values, as one TableFreeError."""
    from huggingface_hub.errors import StrictDataclassError

    from .codes import CodeError

    try:
        yield
    except CodeError as exc:
        raise TableFreeError(str(exc)) from None
    except (ValueError, TypeError, OverflowError, KeyError, StrictDataclassError) as exc:
        cause = exc
        while cause.__cause__ is not None:  # the strict-dataclass errors wrap the validator's own message
            cause = cause.__cause__
        raise TableFreeError(f"invalid model config: {summary(cause)}") from None


def parameter_count(cls, config: PretrainedConfig) -> int:
    """Parameters of `cls(config)`, from models of one and two layers built on the meta device: a config of a
    million layers is counted at once, never built."""
    import copy

    import torch

    def count(layers: int) -> int:
        shallow = copy.deepcopy(config)
        shallow.num_hidden_layers = layers
        with torch.device("meta"):
            return sum(p.numel() for p in cls(shallow).parameters())

    one = count(1)
    return one + (config.num_hidden_layers - 1) * (count(2) - one)


def check_fits(cls, config: PretrainedConfig, dtype=None) -> int:
    """The parameter count of `cls(config)`; MemoryError when its weights alone would not fit in this machine's memory
    (refused before the allocator overcommits and the OOM killer ends the process)."""
    import torch

    dtype = dtype or torch.float32
    count = parameter_count(cls, config)
    size = count * dtype.itemsize
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if size > memory:
        raise MemoryError(f"{count:,} parameters need {size / 2**30:,.1f} GiB in {str(dtype).removeprefix('torch.')}, "
                          f"this machine has {memory / 2**30:,.1f} GiB")
    return count


def build_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model; its weights depend on `seed` alone (the global RNG is left untouched)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    from .configuration_tablefree import TableFreeConfig
    from .modeling_tablefree import TableFreeForCausalLM

    cls = TableFreeForCausalLM if isinstance(config, TableFreeConfig) else GPTNeoXForCausalLM
    try:
        check_fits(cls, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)
    except (RuntimeError, MemoryError) as exc:  # the allocator's "can't allocate memory", or shapes past its limits
        raise TableFreeError(f"cannot build the model: {summary(exc)}; choose smaller sizes") from None


def tokenizer_fields(tokenizer) -> dict:
    """vocab_size and special ids that follow from any tokenizer (V, and so K, come from it)."""
    values = {"vocab_size": len(tokenizer)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values[name] = getattr(tokenizer, name, None)
    if values["pad_token_id"] is None:
        values["pad_token_id"] = values["eos_token_id"]
    return values


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings from the command line; values parse as YAML scalars (ints, floats, lists)."""
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TableFreeError(f"override {pair!r} is not of the form key=value (for example hidden_size=128)")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise TableFreeError(f"override {pair!r}: the value is not a YAML scalar or list ({summary(exc, limit=120)})") from None
    return overrides


def new_command(args) -> int:
    """`tablefree new PRESET OUT`: a freshly initialised model, saved in the Hugging Face form."""
    from .files import output_lock

    with output_lock(args.out, inputs=[args.tokenizer]):
        return _new(args)


def _new(args) -> int:
    from .files import claim_output_dir
    from .hub import MODEL_KIND, check_tokenizer, save_model
    from .tokenizer import as_transformers, build_tokenizer, load_tokenizer

    claim_output_dir(args.out, MODEL_KIND, resumable=False, force=args.force, inputs=[args.tokenizer])
    overrides = parse_overrides(args.overrides)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        overrides = {**tokenizer_fields(tokenizer), **overrides}
    else:
        from .corpus import embedded_documents

        tokenizer = as_transformers(build_tokenizer(embedded_documents(max_docstring_files=0)))
    config = build_config(args.preset, **overrides)
    check_tokenizer(tokenizer, config, args.tokenizer or "the default tokenizer")
    model = build_model(config, seed=args.seed)
    tokenizer.model_max_length = config.max_position_embeddings
    out = save_model(model, args.out, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params:,} parameters -> {out}")
    return 0


def verify_command(args) -> int:
    """`tablefree verify PRESET|MODEL`: the exhaustive injectivity and inverse check over all V ids."""

    from .codes import CodeError, verify_code
    from .configuration_tablefree import TableFreeConfig

    if args.target in PRESETS:
        config = build_config(args.target, **parse_overrides(args.overrides))
    else:
        from .hub import load_config, resolve_model_path

        config = load_config(resolve_model_path(args.target))
        if not isinstance(config, TableFreeConfig):
            print(f"{args.target}: learned input table, no fixed code to verify")
            return 0
    if not isinstance(config, TableFreeConfig):
        print(f"{args.target}: learned input table, no fixed code to verify")
        return 0
    try:
        code = config.build_code()
        verify_code(code)
    except CodeError as exc:
        raise TableFreeError(str(exc)) from None
    print(f"ok: {code.describe()} is injective on all {code.vocab_size:,} ids and decodes exactly")
    return 0


def add_cli(subparsers) -> None:
    new = subparsers.add_parser("new")
    new.add_argument("preset", help=f"SIZE-VARIANT, one of: {', '.join(PRESETS)}")
    new.add_argument("out", help="output directory (new or empty; see --force)")
    new.add_argument("overrides", nargs="*", help="model fields as key=value, e.g. hidden_size=128")
    new.add_argument("--seed", type=int, default=0, help="model seed (initialisation depends on it alone)")
    new.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: code-point tokenizer)")
    new.add_argument("--force", action="store_true",
                     help="write into a non-empty OUT; files tablefree did not write there are never removed or overwritten")
    new.set_defaults(run=new_command)
    verify = subparsers.add_parser("verify")
    verify.add_argument("target", help="a preset name or a model directory")
    verify.add_argument("overrides", nargs="*", help="model fields as key=value (with a preset)")
    verify.set_defaults(run=verify_command)
