import json

import pytest

from tablefree.cli import main
from tablefree.quickstart import PROMPT


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    """The README's first command, shortened to a few steps: every stage runs and both models load."""
    from transformers import AutoModelForCausalLM

    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for needle in ("| affine, untrained |", "| affine ", "| learned ", "4,194,304", repr(PROMPT), "tablefree serve", "tablefree generate"):
        assert needle in printed, needle
    for variant in ("affine", "learned"):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "qs" / variant), trust_remote_code=True)
        assert model.config.hidden_size == 64
    assert json.loads((tmp_path / "qs" / "data" / "manifest.json").read_text())["train_tokens"] > 100_000


def test_quickstart_rejects_bad_steps(capsys):
    assert main(["quickstart", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_quickstart_refuses_an_unknown_device_before_any_work(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()
