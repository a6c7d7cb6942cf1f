import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---- code in a model directory never runs without --trust-remote-code, and nothing ever prompts ----
# Each file writes the sentinel named in it when imported: the test's proof that it ran.
EVIL_MODEL = """import pathlib
pathlib.Path({sentinel!r}).write_text("ran")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


class EvilConfig(GPTNeoXConfig):
    model_type = "evil_lm"


class EvilForCausalLM(GPTNeoXForCausalLM):
    config_class = EvilConfig
"""
EVIL_TOKENIZER = """import pathlib
pathlib.Path({sentinel!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def _remote_code_dir(kind: str, source: Path, root: Path) -> tuple[Path, Path]:
    """(a copy of `source` that asks transformers to import code from it, the file that code writes when it runs)."""
    target, sentinel = root / kind, root / f"{kind}.ran"
    shutil.copytree(source, target)
    if kind == "model":  # a model type transformers does not know, mapped to a file in the directory
        (target / "modeling_evil.py").write_text(EVIL_MODEL.format(sentinel=str(sentinel)))
        _edit_json(target / "config.json", lambda c: c.update(model_type="evil_lm", auto_map={
            "AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}))
    elif kind == "tokenizer":  # the model is ours; its tokenizer's class is only in the directory
        (target / "tokenization_evil.py").write_text(EVIL_TOKENIZER.format(sentinel=str(sentinel)))
        _edit_json(target / "tokenizer_config.json", lambda c: c.update(
            tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}))
    else:  # a saved model of ours whose config lost its model_type: only its auto_map says what it is
        with open(target / "configuration_tablefree.py", "a") as source_file:
            source_file.write(f"\nimport pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n")
        _edit_json(target / "config.json", lambda c: c.pop("model_type"))
    return target, sentinel


@pytest.fixture(scope="module")
def remote_code_dirs(saved_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    (root / "text.txt").write_text("one document\n\nanother document\n")
    return root, {kind: _remote_code_dir(kind, saved_tiny_model[0], root) for kind in ("model", "tokenizer", "lost-type")}


ENTRY_POINTS = {
    "eval": lambda d, root: ["eval", str(d), "--data", str(root / "text.txt"), "--max-tokens", "8"],
    "generate": lambda d, root: ["generate", str(d), "--prompt", "x", "--max-new-tokens", "1"],
    # A model wrongly let through would serve forever: the context is then refused, after loading, instead.
    "serve": lambda d, root: ["serve", str(d), "--port", "0", "--max-model-len", str(2**62)],
    "export": lambda d, root: ["export", str(d), str(root / f"out-{d.name}-neox")],
    "export-gguf": lambda d, root: ["export", str(d), str(root / f"out-{d.name}-gguf"), "--format", "gguf"],
    "verify": lambda d, root: ["verify", str(d)],
    "new-with-tokenizer": lambda d, root: ["new", "tiny-affine", str(root / "out-new"), "--tokenizer", str(d)],
}


# Runs each command line through the CLI's main in one process whose stdin is the test's pipe (what a prompt
# would read), and prints one JSON line per command: its exit status and everything it wrote.
RUN_COMMANDS = """
import contextlib, io, json, sys
from tablefree.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    results.append({"argv": argv, "code": code, "output": out.getvalue()})
print(json.dumps(results))
"""
REMOTE_CODE_CASES = [
    *(("model", entry) for entry in ("eval", "generate", "serve", "export", "export-gguf", "verify")),
    ("tokenizer", "eval"), ("tokenizer", "generate"), ("tokenizer", "serve"), ("tokenizer", "export-gguf"),
    ("tokenizer", "new-with-tokenizer"),
    ("lost-type", "eval"), ("lost-type", "serve"), ("lost-type", "verify"),
]


@pytest.mark.parametrize("stdin", ["answers-y", "open-and-silent"])
def test_directory_code_is_refused_at_once_and_nothing_prompts(remote_code_dirs, tmp_path, stdin):
    """`echo y | tablefree ...` and an open, silent stdin, for every command that loads a model or a tokenizer: no
    `[y/N]` prompt, the directory's code never runs, and one error line names --trust-remote-code."""
    root, dirs = remote_code_dirs
    commands = [ENTRY_POINTS[entry](dirs[kind][0], root) for kind, entry in REMOTE_CODE_CASES]
    process = subprocess.Popen([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env(tmp_path), text=True)
    if stdin == "answers-y":
        process.stdin.write("y\n" * 2 * len(commands))  # a yes for every prompt there could be
        process.stdin.close()
    try:
        out, err = _wait_keeping_stdin_open(process)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    for result in json.loads(out):
        output = result["output"]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert result["code"] == 2 and len(errors) == 1 and "Traceback" not in output, result
        assert "[y/N]" not in output and "--trust-remote-code" in errors[0], result
    assert not [kind for kind, (_, sentinel) in dirs.items() if sentinel.exists()], "code from a model directory ran"


def _wait_keeping_stdin_open(process) -> tuple[str, str]:
    """The process's output once it ends, its stdin left as it is until then (communicate() would close it first,
    and a prompt would read end-of-file and give up instead of waiting)."""
    import threading

    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=stream, k=key: chunks[k].append(s.read()), daemon=True)
               for key, stream in (("out", process.stdout), ("err", process.stderr))]
    for reader in readers:
        reader.start()
    process.wait(timeout=300)  # a hang guard, far above the seconds this takes
    for reader in readers:
        reader.join(timeout=60)
    if not process.stdin.closed:
        process.stdin.close()
    return "".join(chunks["out"]), "".join(chunks["err"])


# ---- a hostile or broken config.json is one error line at every command that loads it, before anything is built ----
def _not(valid: set):
    return lambda value: not (isinstance(value, str) and value in valid)


NESTED = st.one_of(st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ODD_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([2.5, 64.0, -0.0, 1e308]))
NOT_AN_INTEGER = st.one_of(st.text(max_size=6), st.sampled_from(["64", "0x40", ""]), st.none(), st.booleans(), NESTED,
                           ODD_NUMBERS.filter(lambda x: not float(x).is_integer() or isinstance(x, float)))
NOT_A_NUMBER = st.one_of(st.text(max_size=6), st.sampled_from(["1e-5", "nan"]), st.none(), st.booleans(), NESTED)
BAD_SIZE = st.one_of(NOT_AN_INTEGER, st.integers(max_value=0), st.integers(min_value=2**31))
# field -> values every one of which must be refused (the tiny model: width 32, 2 heads, 2 layers, V = 65,536)
HOSTILE = {
    **{name: BAD_SIZE for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                                   "max_position_embeddings")},
    "num_hidden_layers": st.one_of(BAD_SIZE, st.integers(10**9, 2**31 - 1)),  # no machine holds 10**9 layers of width 32
    "vocab_size": st.one_of(BAD_SIZE, st.integers(1, 57_345)),  # below the special tokens' ids
    "layer_norm_eps": st.one_of(NOT_A_NUMBER, st.floats(max_value=0.0), st.floats(min_value=1.5), st.sampled_from([math.nan, math.inf])),
    "code_scale": st.one_of(NOT_A_NUMBER, st.just(0), st.floats(min_value=1e5), st.floats(max_value=-1e5),
                            st.sampled_from([math.nan, -math.inf])),
    "hidden_dropout": st.one_of(NOT_A_NUMBER.filter(lambda x: x is not None), st.floats(min_value=1.5), st.floats(max_value=-0.5)),
    **{name: st.one_of(st.text(max_size=8).filter(_not(valid)), st.integers(), st.booleans(), NESTED, st.none() if none else st.nothing())
       for name, valid, none in (("hidden_act", {"gelu", "relu", "gelu_new", "silu", "tanh"}, True),
                                 ("dtype", {"float32", "float16", "bfloat16", "float64"}, False),
                                 ("code_family", {"minimal", "affine", "hashed"}, True),
                                 ("code_layout", {"tile", "interleave"}, True),
                                 ("code_values", {"binary", "bipolar"}, True))},
    **{name: st.one_of(st.integers(max_value=-1), st.integers(min_value=65_536), st.text(max_size=4), ODD_NUMBERS,
                       st.booleans(), st.dictionaries(st.text(max_size=2), st.integers(), min_size=1, max_size=2))
       for name in ("bos_token_id", "eos_token_id", "pad_token_id")},
    **{name: st.one_of(st.text(max_size=4), st.integers(), ODD_NUMBERS, NESTED) for name in ("use_parallel_residual", "tie_word_embeddings")},
    "rope_parameters": st.one_of(
        st.text(max_size=4), st.integers(), st.none(), st.lists(st.integers(), max_size=2),
        st.fixed_dictionaries({"rope_type": st.text(max_size=8).filter(_not({"default"}))}),
        st.fixed_dictionaries({"rope_type": st.just("default"), "rope_theta": st.one_of(NOT_A_NUMBER, st.floats(max_value=1.0))}),
        st.fixed_dictionaries({"rope_type": st.just("default"), "partial_rotary_factor": st.one_of(
            NOT_A_NUMBER, st.floats(max_value=0.0), st.floats(min_value=1.01), st.just(1 / 16))}),  # 1/16 of 16 dims: odd
    ),
    "code_bits": st.one_of(st.integers(max_value=0), st.integers(min_value=63), st.text(max_size=4), ODD_NUMBERS, st.booleans(), NESTED),
    "affine_rows": st.one_of(st.text(max_size=4), st.integers(), st.lists(st.integers(0, 2**16 - 1), max_size=15),
                             st.lists(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**16), st.text(max_size=2)),
                                      min_size=16, max_size=16),
                             st.just([1] * 16)),  # singular
}
LOADING_COMMANDS = {
    "eval": lambda d, out: ["eval", str(d), "--data", str(d / "text.txt"), "--max-tokens", "8"],
    "generate": lambda d, out: ["generate", str(d), "--prompt", "x", "--max-new-tokens", "1"],
    # A config wrongly let through would serve forever: the context is then refused, after loading, instead.
    "serve": lambda d, out: ["serve", str(d), "--port", "0", "--max-model-len", str(2**62)],
    "export": lambda d, out: ["export", str(d), str(out / "neox")],
    "export-gguf": lambda d, out: ["export", str(d), str(out / "gguf"), "--format", "gguf"],
}


def _timed_out(signum, frame):
    raise TimeoutError("the command did not answer")


@pytest.fixture(scope="module")
def config_target(saved_tiny_model, tmp_path_factory):
    target = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(saved_tiny_model[0], target)
    (target / "text.txt").write_text("one document\n\nanother document\n")
    return target, json.loads((target / "config.json").read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.sampled_from(sorted(HOSTILE)).flatmap(lambda name: st.tuples(st.just(name), HOSTILE[name])),
                        min_size=1, max_size=3))
def test_hostile_config_values_are_one_error_line_at_every_loading_command(config_target, tmp_path_factory, changes):
    """Strings where numbers are, floats, null, negatives, huge sizes, bools and nested objects in config.json: every
    command that loads the model exits 2 with one `error:` line, at once (never a traceback, never a hang)."""
    from tablefree.cli import main

    target, original = config_target
    (target / "config.json").write_text(json.dumps({**original, **dict(changes)}))
    out = tmp_path_factory.mktemp("out")
    previous = signal.signal(signal.SIGALRM, _timed_out)
    try:
        for name, command in LOADING_COMMANDS.items():
            stream = io.StringIO()
            signal.alarm(120)  # a hang guard, far above the moment a refusal takes
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                code = main(command(target, out))
            signal.alarm(0)
            errors = [line for line in stream.getvalue().splitlines() if line.startswith("error: ")]
            assert code == 2 and len(errors) == 1 and "Traceback" not in stream.getvalue(), (name, changes, stream.getvalue())
            assert "--max-model-len" not in errors[0], (name, changes, errors)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer up to 2,147,483,647, got 0"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer up to 2,147,483,647, got '64'"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer up to 2,147,483,647, got 2.5"),
    ({"vocab_size": None}, "vocab_size must be a positive integer up to 2,147,483,647, got None"),
    ({"dtype": "evil"}, "dtype 'evil' is not one of float32, bfloat16, float16, float64"),
    ({"num_hidden_layers": 10**9}, r"cannot load the model in .*: 8,544,002,097,216 parameters need [\d,.]+ GiB in float32"),
    ({"pad_token_id": -1}, "pad_token_id must be a token id below vocab_size 65536"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "rope_theta must be a finite number above 1, got 'x'"),
    ({"tie_word_embeddings": "yes"}, "Field 'tie_word_embeddings' expected bool, got str"),
    ({"model_type": "no_such_model", "auto_map": None}, "config.json is no model config tablefree can load: its model_type 'no_such_model' is not one"),
])
def test_observed_hostile_configs_name_the_problem(config_target, change, message):
    target, original = config_target
    (target / "config.json").write_text(json.dumps({**original, **change}))
    try:
        with pytest.raises(TableFreeError, match=message):
            load_model(target)
    finally:
        (target / "config.json").write_text(json.dumps(original))
