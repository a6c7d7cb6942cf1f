import json

import pytest

from tablefree.cli import main
from tablefree.quickstart import PROMPT


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, capsys):
    """The README's first command, shortened to a few steps: every stage runs and both models load."""
    from transformers import AutoModelForCausalLM

    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    for needle in ("| uniform over all ids ", "| unigram (token frequencies) ", "| affine, untrained ",
                   "| affine (fixed codes) ", "| learned (table) ", "4,194,304", "python-notes bits/byte",
                   "english-prose bits/byte", "docs/results-tokens/gaps.png", "docs/results-share/gaps.png",
                   "Bits per byte:", "training loss (nats/token)", PROMPT, "tablefree serve", "tablefree generate"):
        assert needle in printed, needle
    # The table's numbers are the run's: the untrained row is the untrained model's score, the uniform row log2(V) per token.
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in printed.splitlines()
            if line.startswith("| ") and "bits/byte" not in line}
    assert float(rows["uniform over all ids"][3].replace(",", "")) == 65536.0
    assert float(rows["unigram (token frequencies)"][0]) < float(rows["uniform over all ids"][0])
    # No library progress bars or warnings reach the terminal.
    for stray in ("Loading weights", "Writing model shards", "[transformers]", "Token indices sequence length"):
        assert stray not in printed + captured.err, stray
    assert (tmp_path / "qs" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("affine", "learned"):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "qs" / variant), trust_remote_code=True)
        assert model.config.hidden_size == 64
    assert json.loads((tmp_path / "qs" / "data" / "manifest.json").read_text())["train_tokens"] > 100_000
    # The same OUT with other settings (a shorter run, or an earlier version's): refused, and told where to go instead.
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "2", "--quiet"]) == 2
    assert "`tablefree quickstart --out NEW_DIR` starts afresh" in capsys.readouterr().err


def test_quickstart_rejects_bad_steps(capsys):
    assert main(["quickstart", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_quickstart_refuses_an_unknown_device_before_any_work(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_the_explanation_follows_the_numbers():
    from tablefree.quickstart import explain

    def score(val, held, ppl=100.0):
        return {"val": {"bits_per_byte": val, "ppl": ppl}, "python-notes": {"bits_per_byte": held}}

    base = {"uniform": score(4.1, 5.4), "unigram": score(2.5, 3.5), "untrained": score(4.2, 5.4)}
    text = " ".join(explain({**base, "affine": score(2.4, 3.6, 110.0), "learned": score(2.3, 3.4, 100.0)}).split())
    assert "Both models are below unigram on the validation split, by 0.10 (affine) and 0.20 (learned)" in text
    assert "affine 3.60, not yet below unigram's 3.50; learned 3.40, below unigram's 3.50" in text
    assert "validation PPL +10.0% relative to learned" in text
    prose = {name: {**s, "english-prose": {"bits_per_byte": 3.0 + i / 10}} for i, (name, s) in enumerate(
        {**base, "affine": score(2.4, 3.6, 110.0), "learned": score(2.3, 3.4, 100.0)}.items())}
    text = " ".join(explain(prose).split())  # unigram 3.1, affine 3.3, learned 3.4: neither below
    assert "On english-prose, text of another kind" in text
    assert "affine 3.30, not yet below unigram's 3.10; learned 3.40, not yet below unigram's 3.10" in text
    text = " ".join(explain({**base, "affine": score(2.6, 3.6, 90.0), "learned": score(2.4, 3.6, 100.0)}).split())
    assert "Below unigram on the validation split: learned." in text and "PPL -10.0%" in text
