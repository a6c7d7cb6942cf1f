import io
import subprocess
import sys

import pytest

from tablefree.cli import main
from tablefree.errors import TableFreeError
from tablefree.generate import generate_command


def test_greedy_generation_streams_the_same_text_it_returns(saved_tiny_model):
    path, _ = saved_tiny_model
    stream = io.StringIO()
    text = generate_command(str(path), "Question: What is the capital of UK?\nAnswer:", max_new_tokens=6, stream=stream)
    assert stream.getvalue() == text + "\n" and text


def test_sampling_is_fixed_by_the_seed(saved_tiny_model):
    path, _ = saved_tiny_model
    run = lambda seed: generate_command(str(path), "Once upon a time,", 12, 1.0, 50, 0.95, seed, io.StringIO())  # noqa: E731
    assert run(7) == run(7)
    assert len({run(s) for s in range(4)}) > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
        ({"temperature": -1.0}, "--temperature must be >= 0"),
        ({"top_p": 1.5}, "--top-p must be in \\(0, 1\\]"),
        ({"max_new_tokens": 10_000}, "exceeds the model's context of 256 tokens"),
    ],
)
def test_bad_generation_settings_are_clear_errors(saved_tiny_model, kwargs, message):
    path, _ = saved_tiny_model
    with pytest.raises(TableFreeError, match=message):
        generate_command(str(path), "hi", stream=io.StringIO(), **kwargs)


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
