import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_data import prepared_data, train_overrides  # noqa: F401  (fixture)

from tablefree.errors import TableFreeError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(prepared_data, tmp_path_factory):
    from tablefree.train import make_config, train

    out = tmp_path_factory.mktemp("trained") / "run"
    result = train(make_config(train_overrides(prepared_data, out, max_steps=8, lr=1e-2)))
    return out / "model", result


def test_eval_cli_on_prepared_data_and_on_a_file(trained, prepared_data, tmp_path, capsys):
    from tablefree.cli import main
    from tablefree.evaluate import evaluate_model

    model_dir, result = trained
    assert main(["eval", str(model_dir), "--data", str(prepared_data), "--seq-len", "32", "--max-tokens", "512"]) == 0
    printed = capsys.readouterr().out
    assert f"ppl {result['val_ppl']:.3f}" in printed and "bits/byte" in printed
    text = tmp_path / "held_out.txt"
    text.write_text("The for statement iterates over a sequence.\n\nA list is a mutable sequence.\n")
    scores = evaluate_model(str(model_dir), str(text), seq_len=16)
    assert 0 < scores["bits_per_byte"] < 20 and scores["tokens"] > 5
    assert main(["eval", str(model_dir), "--data", str(tmp_path / "missing")]) == 2


def _windows(lengths: list[int], vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n + 1) for n in lengths]


def _full_logits_scores(model, windows, byte_lengths) -> dict:
    """The unchunked reference: every window's whole logits at once, then cross-entropy."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    nats, tokens, n_bytes = 0.0, 0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.as_tensor(window)[None]
            logits = model(input_ids=ids[:, :-1]).logits
            nats += F.cross_entropy(logits.flatten(0, 1), ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
            n_bytes += int(np.asarray(byte_lengths)[window[1:]].sum())
    return {"loss": nats / tokens, "bits_per_byte": nats / math.log(2) / n_bytes, "tokens": tokens}


@pytest.mark.parametrize("variant", ["affine", "learned"])
def test_chunked_loss_equals_full_logits_and_never_holds_them_all(variant):
    import numpy as np
    import torch
    from conftest import tiny_config

    from tablefree.evaluate import evaluate_windows
    from tablefree.presets import build_model

    model = build_model(tiny_config(variant), seed=3).eval()
    vocab = model.config.vocab_size
    byte_lengths = np.random.default_rng(1).integers(0, 4, size=vocab)
    windows = _windows([24, 24, 24, 24, 24, 9], vocab)  # two full batches of two, then a shorter tail alone
    rows_per_call = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows_per_call.append(out[..., 0].numel()))
    chunked = evaluate_windows(model, windows, byte_lengths, torch.device("cpu"), batch_windows=2, max_logits=7 * vocab)
    hook.remove()
    assert max(rows_per_call) == 7 and sum(rows_per_call) == chunked["tokens"] == 5 * 24 + 9
    full = _full_logits_scores(model, windows, byte_lengths)
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert chunked["bits_per_byte"] == pytest.approx(full["bits_per_byte"], rel=1e-6)


def test_a_compiled_model_is_scored_as_the_model_itself():
    import numpy as np
    import torch
    from conftest import tiny_config

    from tablefree.evaluate import evaluate_windows
    from tablefree.presets import build_model

    model = build_model(tiny_config("affine"), seed=2)
    windows = _windows([16, 16, 5], model.config.vocab_size)
    byte_lengths = np.ones(model.config.vocab_size, dtype=np.int64)
    bare = evaluate_windows(model, windows, byte_lengths, torch.device("cpu"))
    compiled = evaluate_windows(torch.compile(model), windows, byte_lengths, torch.device("cpu"))
    assert compiled == bare and model.training  # the training mode it had comes back


def test_eval_of_something_else_than_a_gpt_neox_lm_is_an_error():
    import numpy as np
    import torch

    from tablefree.evaluate import evaluate_windows

    with pytest.raises(TableFreeError, match="scores GPT-NeoX causal LMs .* not Linear; score other models with lm-evaluation-harness"):
        evaluate_windows(torch.nn.Linear(2, 2), _windows([4], 2), np.ones(2, dtype=np.int64), torch.device("cpu"))


def test_eval_repeats_the_training_validation_exactly(trained, prepared_data, capsys):
    from tablefree.cli import main
    from tablefree.evaluate import evaluate_model
    from tablefree.files import read_json
    from tablefree.runtime import resolve_runtime

    model_dir, _ = trained
    run = read_json(model_dir.parent / "result.json", "result")
    scores = evaluate_model(str(model_dir), str(prepared_data), seq_len=32, max_tokens=512)
    assert (scores["loss"], scores["ppl"], scores["bits_per_byte"]) == (run["val_loss"], run["val_ppl"], run["val_bits_per_byte"])
    dtype = str(resolve_runtime("cpu").dtype).removeprefix("torch.")  # the run's: auto's choice on this CPU
    assert main(["eval", str(model_dir), "--data", str(prepared_data), "--seq-len", "32", "--max-tokens", "512",
                 "--device", "cpu", "--dtype", dtype]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"evaluating on {resolve_runtime('cpu', dtype).describe()}\n")
    assert f"val loss {run['val_loss']:.4f}  ppl {run['val_ppl']:.3f}  bits/byte {run['val_bits_per_byte']:.4f}  (512 tokens)" in printed


def test_eval_in_bfloat16_repeats_a_bfloat16_training_run(prepared_data, tmp_path):
    from tablefree.evaluate import evaluate_model
    from tablefree.runtime import resolve_runtime
    from tablefree.train import make_config, train

    run = train(make_config(train_overrides(prepared_data, tmp_path / "run", max_steps=2, dtype="bfloat16")))
    model_dir = str(tmp_path / "run" / "model")
    bf16 = evaluate_model(model_dir, str(prepared_data), seq_len=32, max_tokens=512, runtime=resolve_runtime("cpu", "bfloat16"))
    assert (bf16["loss"], bf16["bits_per_byte"]) == (run["val_loss"], run["val_bits_per_byte"])
    fp32 = evaluate_model(model_dir, str(prepared_data), seq_len=32, max_tokens=512, runtime=resolve_runtime("cpu", "float32"))
    assert fp32["loss"] != bf16["loss"] and fp32["loss"] == pytest.approx(bf16["loss"], rel=0.02)


def test_eval_token_limits_at_the_extremes(trained, prepared_data):
    from tablefree.data import TokenShards
    from tablefree.evaluate import evaluate_model

    model_dir, _ = trained
    val_tokens = sum(shard.size - 1 for shard in TokenShards(prepared_data, "val").arrays)  # predicted tokens
    assert evaluate_model(str(model_dir), str(prepared_data), seq_len=32, max_tokens=1)["tokens"] == 1
    everything = evaluate_model(str(model_dir), str(prepared_data), seq_len=2**62, max_tokens=2**63)
    assert everything["tokens"] == val_tokens
    assert everything["loss"] > 0 and everything["bits_per_byte"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float64"], "unknown dtype 'float64'; choose auto"),
    (["--device", "tpu"], "unknown device 'tpu'; choose auto"),
    (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on the CPU"),
])
def test_eval_runtime_flags_name_what_is_accepted(trained, prepared_data, capsys, flags, message):
    from tablefree.cli import main

    model_dir, _ = trained
    assert main(["eval", str(model_dir), "--data", str(prepared_data), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_help_names_its_defaults_once(capsys):
    import inspect

    from tablefree.cli import main
    from tablefree.evaluate import EVAL_TOKENS, evaluate_model

    assert inspect.signature(evaluate_model).parameters["max_tokens"].default == EVAL_TOKENS
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {EVAL_TOKENS})" in text and "--device" in text and "--dtype" in text


def test_bits_per_byte_counts_utf8_bytes(code_point_tokenizer):
    from tablefree.evaluate import token_byte_lengths
    from tablefree.tokenizer import EOS_ID

    lengths = token_byte_lengths(code_point_tokenizer, 65536)
    assert lengths[ord("a")] == 1 and lengths[ord("é")] == 2 and lengths[ord("€")] == 3 and lengths[EOS_ID] == 0
    ngram = code_point_tokenizer.encode(" the", add_special_tokens=False)
    assert sum(lengths[i] for i in ngram) == 4


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from training_data import topic_documents

    from tablefree.tokenizer import as_transformers, build_byte_level_tokenizer

    return as_transformers(build_byte_level_tokenizer(topic_documents(), 600))


BYTE_SAMPLES = ["The function returns the value.", "naïve café: 5 € — 日本語\n\tdone", "smile \U0001F600\U0001F3FD ok",
                "\x00\x7f\ufffd spaces   \r\n"]


def test_a_file_quoting_special_tokens_is_scored_as_its_text(code_point_tokenizer):
    """Evaluated text is encoded as prepared data is: "</s>" inside a document is its four characters, and the only
    end-of-text ids are the separators after each document."""
    from tablefree.evaluate import document_windows
    from tablefree.tokenizer import EOS_ID

    documents = ["a </s> b <s> c", "<unk>"]
    (window,) = document_windows(documents, code_point_tokenizer, 64, None, "the file")
    special = set(code_point_tokenizer.all_special_ids)
    assert [i for i in window.tolist() if i in special] == [EOS_ID, EOS_ID]
    assert code_point_tokenizer.decode(window.tolist()) == "a </s> b <s> c</s><unk></s>"


@pytest.mark.parametrize("kind", ["code-point", "byte-level"])
def test_byte_lengths_of_encoded_text_sum_to_its_utf8_bytes(kind, code_point_tokenizer, byte_level_tokenizer):
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st

    from tablefree.evaluate import token_byte_lengths
    from tablefree.tokenizer import SPECIAL_TOKENS, has_slot

    tokenizer = code_point_tokenizer if kind == "code-point" else byte_level_tokenizer
    lengths = token_byte_lengths(tokenizer, len(tokenizer))
    assert lengths[tokenizer.eos_token_id] == 0 and lengths[tokenizer.pad_token_id] == 0  # special tokens add no text
    chars = st.characters(exclude_categories=("Cs",))
    if kind == "code-point":  # a character without a slot is <unk>, not its bytes
        chars = chars.filter(has_slot)

    def check(text):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))

    @settings(max_examples=150, deadline=None)
    @given(st.text(alphabet=chars, max_size=40))
    def check_any(text):
        assume(not any(name in text for name in SPECIAL_TOKENS))  # written in the text, a special token is matched
        check(text)

    for text in BYTE_SAMPLES if kind == "byte-level" else [t for t in BYTE_SAMPLES if all(map(has_slot, t))]:
        check(text)
    check_any()


def test_byte_fallback_tokens_count_one_byte_each():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tablefree.evaluate import token_byte_lengths

    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "▁a": 258, "▁": 259, "a": 260}
    backend = Tokenizer(models.BPE(vocab, [("▁", "a")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    lengths = token_byte_lengths(tokenizer, 261)
    text = "a € a 😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[2 + 0xE2] == 1 and lengths[1] == 0


def test_byte_level_symbols_count_one_byte_each(byte_level_tokenizer):
    from tablefree.evaluate import token_byte_lengths

    lengths = token_byte_lengths(byte_level_tokenizer, 700)
    assert lengths[:256].tolist() == [1] * 256  # 'Ġ' (a space) is one byte, though two in UTF-8
    assert lengths[256:279].tolist() == [0] * 23 and lengths[600:].tolist() == [0] * 100
    assert (lengths[279:600] >= 2).all()


TASK = """task: tablefree_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_harness_runs_a_saved_model(trained, tmp_path):
    model_dir, _ = trained
    rows = [
        {"question": "Question: What does the for statement do?\nAnswer:", "choices": [" iterates", " zebra"], "label": 0},
        {"question": "Question: Which keyword defines a function?\nAnswer:", "choices": [" def", " banana"], "label": 0},
        {"question": "Question: What is a list?\nAnswer:", "choices": [" a sequence", " a planet"], "label": 0},
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tablefree_toy.yaml").write_text(TASK.format(data=data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf",
               "--model_args", f"pretrained={model_dir},trust_remote_code=True", "--tasks", "tablefree_toy",
               "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result_files = list((tmp_path / "out").rglob("results_*.json"))
    assert result_files, done.stdout[-2000:]
    results = json.loads(result_files[0].read_text())["results"]["tablefree_toy"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert results.get("alias") == "tablefree_toy"


def test_missing_model_is_a_clear_error(tmp_path):
    from tablefree.evaluate import evaluate_model

    with pytest.raises(TableFreeError, match="no model at"):
        evaluate_model(str(tmp_path / "nothing"), str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"   \n\n \t \n\n\n", "\u00a0\u2003\n".encode()])
def test_eval_of_a_file_without_text_is_an_error_not_a_score(trained, tmp_path, capsys, content):
    from tablefree.cli import main

    model_dir, _ = trained
    blank = tmp_path / "blank.txt"
    blank.write_bytes(content)
    assert main(["eval", str(model_dir), "--data", str(blank)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("is empty" in err or "holds no text to evaluate" in err), err


def test_eval_names_bad_input_and_bad_numbers(trained, tmp_path):
    from tablefree.evaluate import evaluate_model

    model_dir, _ = trained
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("A list is a sequence.\n\nCafé\n".encode("latin-1"))
    with pytest.raises(TableFreeError, match=r"line 3: invalid UTF-8 at byte 26"):
        evaluate_model(str(model_dir), str(latin1), seq_len=16)
    from tablefree.corpus import ReadOptions

    scores = evaluate_model(str(model_dir), str(latin1), seq_len=16, options=ReadOptions(bad_text="replace"))
    assert scores["tokens"] > 5
    for bad in ({"max_tokens": 0}, {"seq_len": -1}):
        with pytest.raises(TableFreeError, match="must be a positive number"):
            evaluate_model(str(model_dir), str(latin1), **bad)


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_present(), reason="needs a CUDA device")
def test_eval_on_cuda_in_bfloat16_agrees_with_the_cpu(trained, prepared_data):
    from tablefree.evaluate import evaluate_model
    from tablefree.runtime import resolve_runtime

    model_dir, _ = trained
    cpu = evaluate_model(str(model_dir), str(prepared_data), seq_len=32, max_tokens=512, runtime=resolve_runtime("cpu", "float32"))
    cuda = evaluate_model(str(model_dir), str(prepared_data), seq_len=32, max_tokens=512, runtime=resolve_runtime("auto", "auto"))
    assert cuda["tokens"] == cpu["tokens"] and cuda["loss"] == pytest.approx(cpu["loss"], rel=0.02)
