"""tablefree: language models without a trainable input embedding table (arXiv 2605.09751)."""

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Let AutoConfig, AutoModel and AutoModelForCausalLM load saved table-free models without remote code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_tablefree import TableFreeConfig
    from .modeling_tablefree import TableFreeForCausalLM, TableFreeModel

    AutoConfig.register("tablefree", TableFreeConfig, exist_ok=True)
    AutoModel.register(TableFreeConfig, TableFreeModel, exist_ok=True)
    AutoModelForCausalLM.register(TableFreeConfig, TableFreeForCausalLM, exist_ok=True)


# So that a saved model loads through the Auto classes without trust_remote_code where the package is installed.
register_auto_classes()

from .codes import CodeLift, build_code, verify_code
from .configuration_tablefree import TableFreeConfig
from .errors import TableFreeError
from .modeling_tablefree import TableFreeForCausalLM, TableFreeModel

__all__ = [
    "CodeLift",
    "TableFreeConfig",
    "TableFreeError",
    "TableFreeForCausalLM",
    "TableFreeModel",
    "build_code",
    "register_auto_classes",
    "verify_code",
]
