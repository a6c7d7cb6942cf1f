import atexit
import os
import shutil
import tempfile

import pytest

# Tests never touch the network: hub ids resolve from a local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The native library (tablefree/serve/native.py) is built into a folder of this run's own, not the user's cache
# (which may not be writable where tests run); the servers the tests start inherit it.
if "TABLEFREE_CACHE" not in os.environ:
    os.environ["TABLEFREE_CACHE"] = tempfile.mkdtemp(prefix="tablefree-tests-")
    atexit.register(shutil.rmtree, os.environ["TABLEFREE_CACHE"], True)


@pytest.fixture(scope="session")
def code_point_tokenizer():
    """The code-point tokenizer with n-gram slots learned from the interpreter's help topics."""
    from tablefree.corpus import embedded_documents
    from tablefree.tokenizer import as_transformers, build_tokenizer

    return as_transformers(build_tokenizer(embedded_documents(max_docstring_files=0)), model_max_length=256)


def tiny_config(variant: str = "affine", **overrides):
    from tablefree.presets import build_config

    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return build_config(f"tiny-{variant}", **{**fields, **overrides})


# Every input interface, as the serving engines' tests run them.
ENGINE_VARIANTS = {
    "minimal": ("minimal", {}),
    "affine": ("affine", {}),
    "gray": ("gray", {}),
    "hashed-16": ("hashed", {"code_bits": 16}),
    "hashed-32": ("hashed", {"code_bits": 32}),
    "interleave": ("affine", {"code_layout": "interleave"}),
    "bipolar": ("affine", {"code_values": "bipolar"}),
    "scale-0.25": ("affine", {"code_scale": 0.25}),
    "learned": ("learned", {}),
}


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory, code_point_tokenizer):
    """A tiny table-free model saved in the Hugging Face form, with its tokenizer."""
    from tablefree.hub import save_model
    from tablefree.presets import build_model

    model = build_model(tiny_config("affine"), seed=1).eval()
    path = save_model(model, tmp_path_factory.mktemp("models") / "tiny-affine", code_point_tokenizer)
    return path, model
