"""tablefree: language models without a trainable input embedding table (arXiv 2605.09751).

The names below load on first use (PEP 562), so `import tablefree` and `tablefree --help` do not import
torch or transformers. Using a model class registers the Auto classes, after which a saved model loads
through AutoModelForCausalLM without trust_remote_code; `register_auto_classes()` does it explicitly.
"""

import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "CodeLift": "codes",
    "build_code": "codes",
    "verify_code": "codes",
    "TableFreeConfig": "configuration_tablefree",
    "TableFreeError": "errors",
    "TableFreeModel": "modeling_tablefree",
    "TableFreeForCausalLM": "modeling_tablefree",
}


def register_auto_classes() -> None:
    """Let AutoConfig, AutoModel and AutoModelForCausalLM load saved table-free models without remote code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_tablefree import TableFreeConfig
    from .modeling_tablefree import TableFreeForCausalLM, TableFreeModel

    AutoConfig.register("tablefree", TableFreeConfig, exist_ok=True)
    AutoModel.register(TableFreeConfig, TableFreeModel, exist_ok=True)
    AutoModelForCausalLM.register(TableFreeConfig, TableFreeForCausalLM, exist_ok=True)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tablefree' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    if _EXPORTS[name] in ("configuration_tablefree", "modeling_tablefree"):
        register_auto_classes()
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [*_EXPORTS, "register_auto_classes"]
