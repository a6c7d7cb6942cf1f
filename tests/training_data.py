"""Shared by the data/train/compare/evaluate tests: a small corpus file and a prepared directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 64}


def topic_documents(count: int = 240, chars: int = 700) -> list[str]:
    """Real English text without the stdlib parse: the interpreter's help topics, in pieces of `chars`."""
    from pydoc_data.topics import topics

    pieces = [topics[name][i : i + chars] for name in sorted(topics) for i in range(0, len(topics[name]), chars)]
    return [p for p in pieces if p.strip()][:count]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def train_overrides(data_dir: Path, out: Path, **extra) -> dict:
    """A training config for a 1-layer width-32 model that takes a fraction of a second per step."""
    values = dict(
        data=str(data_dir), out=str(out), preset="tiny-affine", model=dict(TINY_MODEL), seq_len=32,
        batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, eval_tokens=512, checkpoint_every=0,
        log_every=1, progress=False,
    )
    values.update(extra)
    return values


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, code_point_tokenizer) -> Path:
    from tablefree.data import PrepareSettings, Source, prepare

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_jsonl(root / "topics.jsonl", topic_documents())
    out = root / "data"
    prepare(PrepareSettings(sources=[Source(str(corpus))], val_fraction=0.1, shard_tokens=20_000), out, code_point_tokenizer, progress=False)
    return out


def word_tokenizer(words: int):
    """A word-level tokenizer of `words` words w0, w1, ... plus [UNK] and </s> (its eos), made with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({"[UNK]": words, "</s>": words + 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def word_documents(count: int, words: int, seed: int = 0) -> list[str]:
    """`count` documents of 20-80 words drawn from the first `words` words, the last ones always among them."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(20, 80))) + f" w{words - 1 - i % 3}"
            for i in range(count)]
