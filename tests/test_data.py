import json
import os
import shutil

import numpy as np
import pytest
from training_data import prepared_data, topic_documents, write_jsonl  # noqa: F401  (fixture)

from tablefree.data import PrepareSettings, Source, TokenShards, is_validation, parse_source, prepare
from tablefree.errors import TableFreeError
from tablefree.tokenizer import EOS_ID


def _parquet(path, texts):
    from datasets import Dataset

    Dataset.from_dict({"text": texts}).to_parquet(str(path))
    return path


def _decode_split(out, tokenizer, split):
    shards = TokenShards(out, split)
    ids = np.concatenate([np.asarray(a) for a in shards.arrays])
    docs, start = [], 0
    for end in np.flatnonzero(ids == EOS_ID):
        docs.append(tokenizer.decode(ids[start:end].tolist()))
        start = end + 1
    assert start == ids.size, "every split ends with </s>"
    return docs


def test_jsonl_and_parquet_mixture_roundtrip(tmp_path, code_point_tokenizer):
    texts = topic_documents(120)
    jsonl = write_jsonl(tmp_path / "a.jsonl", texts[:60])
    parquet = _parquet(tmp_path / "b.parquet", texts[60:])
    settings = PrepareSettings(sources=[Source(str(jsonl)), Source(str(parquet))], val_fraction=0.2, shard_tokens=5000)
    manifest = prepare(settings, tmp_path / "out", code_point_tokenizer, progress=False)

    train_docs = _decode_split(tmp_path / "out", code_point_tokenizer, "train")
    val_docs = _decode_split(tmp_path / "out", code_point_tokenizer, "val")
    # Held out by document: every document lands in exactly one split, text intact, order kept.
    assert sorted(train_docs + val_docs) == sorted(t for t in texts if t)
    assert set(train_docs).isdisjoint(val_docs)
    expected_val = [t for i, t in enumerate(texts[:60]) if is_validation(0, i, 0.2, 0)]
    assert val_docs[: len(expected_val)] == expected_val
    assert len(manifest["sources"]) == 2 and manifest["sources"][1]["documents"] == len(texts) - 60
    assert manifest["train_tokens"] + manifest["val_tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 1
    for shard in manifest["shards"]:
        assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]


def test_budget_and_weights(tmp_path, code_point_tokenizer):
    texts = topic_documents(200)
    a = write_jsonl(tmp_path / "a.jsonl", texts[:100])
    b = write_jsonl(tmp_path / "b.jsonl", texts[100:])
    settings = PrepareSettings(sources=[parse_source(f"{a}@3"), parse_source(f"{b}@1")], budget_tokens=8000, val_fraction=0.05)
    manifest = prepare(settings, tmp_path / "out", code_point_tokenizer, progress=False)
    first, second = (s["train_tokens"] for s in manifest["sources"])
    # Each source stops at the first document that reaches its share of the budget.
    assert 6000 <= first < 6000 + 1600 and 2000 <= second < 2000 + 1600
    assert not manifest["sources"][0]["exhausted"]


def test_deterministic_and_resumable(tmp_path, code_point_tokenizer, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(150))
    settings = PrepareSettings(sources=[Source(str(corpus))], val_fraction=0.1, shard_tokens=3000)
    reference = prepare(settings, tmp_path / "ref", code_point_tokenizer, progress=False)

    import tablefree.data as data

    real_write, writes = data._write_atomic, []

    def write_then_crash(path, payload):
        if path.suffix == ".bin" and len(writes) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half way
        writes.append(path.name)
        real_write(path, payload)

    monkeypatch.setattr(data, "_write_atomic", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, tmp_path / "resumed", code_point_tokenizer, progress=False)
    assert (tmp_path / "resumed" / "progress.json").exists() and not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(TableFreeError, match="interrupted"):
        TokenShards(tmp_path / "resumed", "train")
    monkeypatch.setattr(data, "_write_atomic", real_write)
    resumed = prepare(settings, tmp_path / "resumed", code_point_tokenizer, progress=False)
    assert resumed["shards"] == reference["shards"]
    for shard in reference["shards"]:
        assert (tmp_path / "ref" / shard["file"]).read_bytes() == (tmp_path / "resumed" / shard["file"]).read_bytes()


def test_clear_errors(tmp_path, code_point_tokenizer):
    with pytest.raises(TableFreeError, match="no such file"):
        prepare(PrepareSettings(sources=[Source(str(tmp_path / "missing.jsonl"))]), tmp_path / "o1", code_point_tokenizer, progress=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(TableFreeError, match="empty"):
        prepare(PrepareSettings(sources=[Source(str(empty))]), tmp_path / "o2", code_point_tokenizer, progress=False)
    with pytest.raises(TableFreeError, match="budget"):
        prepare(PrepareSettings(sources=[parse_source("a.jsonl@2"), parse_source("b.jsonl@1")]), tmp_path / "o3", code_point_tokenizer)
    with pytest.raises(TableFreeError, match="weight"):
        parse_source("a.jsonl@heavy")
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(TableFreeError, match="cannot read dataset 'no-such-owner/no-such-dataset'"):
        prepare(PrepareSettings(sources=[Source("hf:no-such-owner/no-such-dataset:default")]), tmp_path / "o4", code_point_tokenizer, progress=False)


def test_cli_prepare_and_existing_output(tmp_path, prepared_data):
    from tablefree.cli import main

    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(40))
    tok = prepared_data / "tokenizer"
    args = ["data", "prepare", "--source", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "d"), "--quiet", "--val-fraction", "0.2"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert main(args) == 0  # prepared already: a no-op with the same settings
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == manifest
    assert main(args[:-1] + ["0.3"]) == 2  # other settings into the same directory: refused, nothing lost
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == manifest
    shutil.rmtree(tmp_path / "d")
