import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tablefree.errors import TableFreeError
from tablefree.hub import load_model, save_model

PROMPT = "Question: What is the capital of UK?\nAnswer:"

# The model card's snippet, run where `tablefree` cannot be imported.
HIDDEN_PACKAGE_SNIPPET = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideTablefree(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tablefree" or name.startswith("tablefree."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, HideTablefree())
    try:
        import tablefree  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("tablefree is importable: the test would prove nothing")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    prompt = "Question: What is the capital of UK?\\nAnswer:"
    input_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
    output_ids = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.save({"input_ids": input_ids, "output_ids": output_ids, "logits": logits,
                "module": type(model).__module__, "modules": sorted(sys.modules)}, out)
    """
)


def _clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    return env


def test_saved_directory_is_self_contained(saved_tiny_model):
    path, _ = saved_tiny_model
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "codes.py", "configuration_tablefree.py", "modeling_tablefree.py"} <= names  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tablefree.TableFreeForCausalLM"
    assert config["model_type"] == "tablefree" and len(config["affine_rows"]) == 16
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (57345, 57346, 57344)


def test_reload_through_the_package_gives_identical_logits(saved_tiny_model, code_point_tokenizer):
    path, original = saved_tiny_model
    model, tokenizer = load_model(path)
    ids = torch.tensor([code_point_tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tokenizer.encode(PROMPT) == code_point_tokenizer.encode(PROMPT)


def test_model_card_snippet_runs_without_the_package_and_matches_exactly(saved_tiny_model, tmp_path):
    path, original = saved_tiny_model
    script, out = tmp_path / "snippet.py", tmp_path / "out.pt"
    script.write_text(HIDDEN_PACKAGE_SNIPPET)
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(out)],
        cwd=tmp_path, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out)
    assert not any(m == "tablefree" or m.startswith("tablefree.") for m in got["modules"])
    assert got["module"].startswith("transformers_modules.")  # the copied source files, not the package
    with torch.no_grad():
        expected = original(got["input_ids"]).logits
        expected_ids = original.generate(got["input_ids"], max_new_tokens=3, do_sample=False)
    assert torch.equal(got["logits"], expected)
    assert torch.equal(got["output_ids"], expected_ids)


def test_hub_id_loads_from_the_local_cache_offline(saved_tiny_model, tmp_path):
    path, _ = saved_tiny_model
    snapshot = tmp_path / "hub" / "models--tablefree-test--tiny-affine" / "snapshots" / ("a" * 40)
    shutil.copytree(path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    env = {**_clean_env(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    cli = [sys.executable, "-m", "tablefree.cli", "generate", "tablefree-test/tiny-affine", "--prompt", "Hello", "--max-new-tokens", "2"]
    result = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    missing = subprocess.run(cli[:4] + ["tablefree-test/absent"] + cli[5:], env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "not a hub id in the local Hugging Face cache" in missing.stderr


def _copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_missing_weights_file_is_a_clear_error(saved_tiny_model, tmp_path):
    target = _copy(saved_tiny_model[0], tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(TableFreeError, match="has no weights file \\(expected model.safetensors\\)"):
        load_model(target)


def test_corrupted_weights_file_is_a_clear_error(saved_tiny_model, tmp_path):
    target = _copy(saved_tiny_model[0], tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TableFreeError, match="corrupted or truncated"):
        load_model(target)


def test_singular_matrix_in_a_hand_edited_config_is_a_clear_error(saved_tiny_model, tmp_path):
    target = _copy(saved_tiny_model[0], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["affine_rows"][1] = config["affine_rows"][0]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(TableFreeError, match="singular over GF\\(2\\)"):
        load_model(target)


def test_tokenizer_larger_than_the_model_is_a_clear_error(saved_tiny_model, tmp_path):
    from tokenizers import Tokenizer, models

    from tablefree.tokenizer import as_transformers

    target = _copy(saved_tiny_model[0], tmp_path)
    config = json.loads((target / "config.json").read_text())
    small = as_transformers(Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0")))
    save_model(load_model(target, with_tokenizer=False)[0], target, small)
    config_small = json.loads((target / "config.json").read_text())
    assert config_small["vocab_size"] == config["vocab_size"]
    big = as_transformers(Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}, unk_token="w0")))
    big.save_pretrained(str(target))
    with pytest.raises(TableFreeError, match="has 70000 tokens but the model's vocab_size is 65536"):
        load_model(target)


def test_saving_over_an_existing_model_keeps_foreign_files_and_drops_only_its_own(saved_tiny_model, tmp_path, code_point_tokenizer):
    path, model = saved_tiny_model
    target = _copy(path, tmp_path)
    (target / "notes.txt").write_text("mine, not tablefree's")
    save_model(model, target)  # no tokenizer this time: the tokenizer files of the earlier save are tablefree's own
    assert (target / "notes.txt").read_text() == "mine, not tablefree's"
    assert not (target / "tokenizer.json").exists() and (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tablefree-tmp-" in p.name]
    assert load_model(target, with_tokenizer=False)[0] is not None


def test_saving_never_overwrites_a_file_tablefree_did_not_write(saved_tiny_model, tmp_path):
    path, model = saved_tiny_model
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "config.json").write_text('{"theirs": true}')
    with pytest.raises(TableFreeError, match=r"config.json already exists and was not written by tablefree"):
        save_model(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert json.loads((target / "config.json").read_text()) == {"theirs": True}
    assert not [p for p in tmp_path.iterdir() if ".tablefree-tmp-" in p.name]


def test_saved_files_are_readable_by_others(saved_tiny_model):
    mask = os.umask(0o022)
    os.umask(mask)
    for file in saved_tiny_model[0].iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file


def test_temporaries_of_a_killed_save_are_cleaned_at_the_next_run(saved_tiny_model, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".m.tablefree-tmp-{int(dead.stdout)}-0badc0de"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    unrelated = tmp_path / ".m.tmp-keep"  # not one of ours: never touched
    unrelated.mkdir()
    save_model(saved_tiny_model[1], tmp_path / "m")
    assert not left.exists() and unrelated.is_dir()


def _rewrite_weights(target, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(target / "model.safetensors"))
    change(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / ".tablefree-output.json").unlink()  # as if the directory came from elsewhere: no checksum to compare


def test_random_bytes_inside_tensor_data_fail_the_recorded_checksum(saved_tiny_model, tmp_path):
    target = _copy(saved_tiny_model[0], tmp_path)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(os.urandom(4096))
    with pytest.raises(TableFreeError, match="does not match the checksum recorded when it was saved"):
        load_model(target)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("gpt_neox.final_layer_norm.weight"), r"tensor gpt_neox.final_layer_norm.weight is missing"),
    (lambda s: s.update({"gpt_neox.extra.weight": torch.zeros(3)}), r"tensor gpt_neox.extra.weight is not part of this model"),
    (lambda s: s["gpt_neox.final_layer_norm.weight"].__setitem__(0, float("nan")), r"final_layer_norm.weight holds non-finite"),
    (lambda s: s["lm_head.weight"].__setitem__((0, 0), float("inf")), r"lm_head.weight holds non-finite"),
])
def test_missing_unexpected_and_non_finite_tensors_are_errors(saved_tiny_model, tmp_path, change, message):
    target = _copy(saved_tiny_model[0], tmp_path)
    _rewrite_weights(target, change)
    with pytest.raises(TableFreeError, match=message):
        load_model(target)


def test_pickle_weights_are_refused_with_what_to_do(saved_tiny_model, tmp_path):
    from safetensors.torch import load_file

    target = _copy(saved_tiny_model[0], tmp_path)
    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    with pytest.raises(TableFreeError, match=r"pickle weights .*can run code.*save_pretrained"):
        load_model(target)
