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


def test_bits_per_byte_counts_utf8_bytes(code_point_tokenizer):
    from tablefree.evaluate import token_byte_lengths
    from tablefree.tokenizer import EOS_ID

    lengths = token_byte_lengths(code_point_tokenizer, 65536)
    assert lengths[ord("a")] == 1 and lengths[ord("é")] == 2 and lengths[ord("€")] == 3 and lengths[EOS_ID] == 0
    ngram = code_point_tokenizer.encode(" the", add_special_tokens=False)
    assert sum(lengths[i] for i in ngram) == 4


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
