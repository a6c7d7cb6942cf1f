import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from transformers import GPTNeoXForCausalLM

from tablefree.errors import TableFreeError
from tablefree.export import export_model, to_gpt_neox
from tablefree.hub import save_model
from tablefree.presets import build_model


@pytest.mark.parametrize(
    "variant, overrides",
    [("affine", {}), ("minimal", {"code_layout": "interleave"}), ("hashed", {"code_bits": 24, "code_values": "bipolar", "code_scale": 0.5})],
)
def test_exported_gpt_neox_checkpoint_has_the_same_logits(variant, overrides, tmp_path, code_point_tokenizer):
    model = build_model(tiny_config(variant, **overrides), seed=3).eval()
    source = save_model(model, tmp_path / "model", code_point_tokenizer)
    out = export_model(str(source), str(tmp_path / "neox"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and "auto_map" not in config
    assert not (out / "modeling_tablefree.py").exists()
    neox = GPTNeoXForCausalLM.from_pretrained(str(out)).eval()  # stock class, no remote code
    ids = torch.randint(0, 65_536, (2, 16))
    with torch.no_grad():
        diff = (neox(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert torch.equal(neox.gpt_neox.embed_in.weight, model.get_input_embeddings().table())
    assert torch.equal(
        neox.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
    )


def test_export_through_the_cli_and_bad_format(saved_tiny_model, tmp_path):
    path, _ = saved_tiny_model
    result = subprocess.run(
        [sys.executable, "-m", "tablefree.cli", "export", str(path), str(tmp_path / "out"), "--format", "onnx"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "unknown export format 'onnx'; choose one of gpt-neox, gguf" in result.stderr
    assert "Traceback" not in result.stderr


def test_learned_model_exports_as_itself():
    model = build_model(tiny_config("learned"), seed=0)
    assert to_gpt_neox(model) is model


@pytest.mark.parametrize("relation", ["same", "parent", "child", "symlink", "dot"])
def test_export_never_writes_into_over_or_above_its_input(saved_tiny_model, tmp_path, monkeypatch, relation):
    path, _ = saved_tiny_model
    source = tmp_path / "parent" / "model"
    shutil.copytree(path, source)
    before = sorted((p.name, p.stat().st_size) for p in source.iterdir())
    link = tmp_path / "link"
    link.symlink_to(source)
    monkeypatch.chdir(source.parent)
    out = {"same": source, "parent": source.parent, "child": source / "neox", "symlink": link, "dot": "."}[relation]
    with pytest.raises(TableFreeError, match=r"(over or around|inside) the input"):
        export_model(str(source), str(out), force=True)
    assert sorted((p.name, p.stat().st_size) for p in source.iterdir()) == before
