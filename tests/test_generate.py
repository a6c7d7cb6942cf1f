import io
import subprocess
import sys

import pytest
import torch

from tablefree.cli import main
from tablefree.errors import TableFreeError
from tablefree.generate import generate_text
from tablefree.hub import load_model


def test_greedy_generation_streams_the_same_text_it_returns(saved_tiny_model):
    path, _ = saved_tiny_model
    stream = io.StringIO()
    text = generate_text(str(path), "Question: What is the capital of UK?\nAnswer:", max_tokens=6, stream=stream)
    assert stream.getvalue() == text + "\n" and text


def test_greedy_generation_equals_transformers_generate(saved_tiny_model):
    """The engine path keeps what `generate` printed when it called model.generate: the same greedy tokens."""
    path, model = saved_tiny_model
    tokenizer = load_model(path)[1]
    prompt = "Once upon a time,"
    ids = torch.tensor([tokenizer.encode(prompt)])
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=model.config.pad_token_id)
    expected = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate_text(str(path), prompt, max_tokens=10, stream=io.StringIO()) == expected


def test_sampling_is_fixed_by_the_seed(saved_tiny_model):
    path, _ = saved_tiny_model

    def run(seed):
        return generate_text(str(path), "Once upon a time,", max_tokens=12, temperature=1.0, top_k=50, top_p=0.95,
                                seed=seed, stream=io.StringIO())

    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


@pytest.mark.parametrize("seed", [-(2**70), -1, 2**64 - 1, 2**70])
def test_any_integer_seed_samples(saved_tiny_model, seed):
    """Seeds reduce modulo 2**64 (as the API's do), so an extreme one is a seed, not an overflow."""
    path, _ = saved_tiny_model
    run = lambda s: generate_text(str(path), "Hi", max_tokens=4, temperature=1.0, seed=s, stream=io.StringIO())  # noqa: E731
    assert run(seed) == run(seed % 2**64)


def test_sampling_fields_mean_what_the_api_says(saved_tiny_model):
    path, _ = saved_tiny_model
    run = lambda **sampling: generate_text(str(path), "Once upon a time,", stream=io.StringIO(), **sampling)  # noqa: E731
    greedy = run(max_tokens=12)
    assert run(max_tokens=12, temperature=1.0, top_k=1, seed=5) == greedy
    assert run(max_tokens=12, temperature=1.0, min_p=1.0, seed=5) == greedy
    stop = greedy[4:6]
    assert stop and run(max_tokens=12, stop=[stop]) == greedy[: greedy.find(stop)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "--max-new-tokens must be at least 1"),
        ({"max_tokens": -3}, "--max-new-tokens -3 is not accepted; give an integer >= 0"),
        ({"temperature": -1.0}, "--temperature -1.0 is not accepted; give a finite number >= 0"),
        ({"temperature": float("nan")}, "--temperature nan is not accepted"),
        ({"top_p": 1.5}, "--top-p 1.5 is not accepted; give a number in \\[0, 1\\]"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty 0.0 is not accepted"),
        ({"stop": [""]}, "--stop must not be empty"),
        ({"max_tokens": 10_000}, "exceeds the model's context of 256 tokens"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"prompt": "snow \udc80"}, "--prompt holds a character that is not valid Unicode at position 5"),
        ({"stop": ["ok", "\ud800"]}, "--stop holds a character that is not valid Unicode at position 0"),
    ],
)
def test_bad_generation_settings_are_clear_errors(saved_tiny_model, kwargs, message):
    path, _ = saved_tiny_model
    prompt = kwargs.pop("prompt", "hi")
    with pytest.raises(TableFreeError, match=message):
        generate_text(str(path), prompt, stream=io.StringIO(), **kwargs)


def test_cli_says_where_it_runs_and_streams_to_stdout(saved_tiny_model, capsys):
    path, _ = saved_tiny_model
    argv = ["generate", str(path), "--prompt", "Once upon a time,", "--max-new-tokens", "12", "--device", "cpu",
            "--dtype", "float32", "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--stop", "\n\n"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "generating on cpu (" in err and "float32" in err
    assert out.endswith("\n") and out[:-1] == generate_text(
        str(path), "Once upon a time,", max_tokens=12, temperature=0.8, top_k=20, seed=3, stop=["\n\n"],
        stream=io.StringIO())


def test_cli_prints_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tablefree.cli", "generate", str(tmp_path / "missing"), "--prompt", "x"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no model at") and "Traceback" not in result.stderr


def test_new_and_verify_commands(tmp_path, capsys):
    assert main(["new", "tiny-gray", str(tmp_path / "m"), "hidden_size=32", "num_attention_heads=1"]) == 0
    assert main(["verify", str(tmp_path / "m")]) == 0
    assert "injective on all 65,536 ids" in capsys.readouterr().out
    assert main(["verify", "paper-hashed", "code_bits=20"]) == 0
    assert main(["new", "tiny-affine", str(tmp_path / "x"), "hidden_size"]) == 2
    assert "is not of the form key=value" in capsys.readouterr().err
