import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from training_data import (  # noqa: F401  (fixture)
    TINY_MODEL,
    prepared_data,
    topic_documents,
    train_overrides,
    word_documents,
    word_tokenizer,
    write_jsonl,
)

from tablefree import files
from tablefree.corpus import PIECE_CHARS
from tablefree.data import (
    BATCH_CHARS,
    PrepareSettings,
    Source,
    TokenShards,
    encode_documents,
    piece_groups,
    is_validation,
    parse_source,
    prepare,
)
from tablefree.errors import TableFreeError
from tablefree.tokenizer import EOS_ID


def _parquet(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), path, row_group_size=16)
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


def _split_ids(out, split):
    return np.concatenate([np.asarray(a) for a in TokenShards(out, split).arrays])


def _prepare_cli(capsys, *args):
    """`tablefree data prepare ARGS --quiet`: (exit code, stderr); a user error is one line, never a traceback."""
    from tablefree.cli import main

    capsys.readouterr()
    code = main(["data", "prepare", *map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    return code, err


def test_english_prose_is_original_prose_that_no_corpus_holds():
    from tablefree.corpus import ENGLISH_PROSE, HELDOUT_TEXTS, embedded_documents, english_prose_documents

    documents = english_prose_documents()
    assert HELDOUT_TEXTS[ENGLISH_PROSE] is english_prose_documents
    assert 12 <= len(documents) <= 16 and 60_000 <= sum(map(len, documents)) <= 72_000
    assert len(set(documents)) == len(documents) and all(doc.count("\n\n") >= 5 for doc in documents)  # paragraphs
    assert {c for doc in documents for c in doc if not c.isascii()} <= {"\u2014", "\u00e9"}  # ASCII, a dash, cafe's e
    # Any 200 characters shared with the embedded corpus would hold one of these aligned 100-character blocks whole.
    embedded = "\n".join(embedded_documents())
    shared = [doc[i:i + 100] for doc in documents for i in range(0, len(doc) - 99, 100) if doc[i:i + 100] in embedded]
    assert not shared, shared[:3]


def test_prose_is_english_to_train_on_that_shares_no_passage_with_the_held_out_texts():
    import re

    from tablefree.corpus import BUILTIN_CORPORA, PROSE, english_prose_documents, prose_documents

    documents = prose_documents()
    assert BUILTIN_CORPORA[PROSE] is prose_documents
    assert len(documents) >= 50 and sum(map(len, documents)) >= 300_000
    assert len(set(documents)) == len(documents) and all(doc.count("\n\n") >= 5 for doc in documents)
    assert {c for doc in documents for c in doc if not c.isascii()} <= set("\u00e9\u00f3\u0144")  # cafe, Bartok, Gdansk
    # No run of 8 words in common with the held-out English prose (the quickstart scores the models on it).
    def runs(text, n=8):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    shared = runs("\n".join(documents)) & runs("\n".join(english_prose_documents()))
    assert not shared, sorted(shared)[:3]


def test_prose_is_a_source_by_name_beside_the_embedded_corpus(tmp_path, code_point_tokenizer, prepared_data, capsys):
    from tablefree.corpus import prose_documents

    documents = prose_documents()
    settings = PrepareSettings(sources=[Source("prose")], val_fraction=0.1, shard_tokens=1 << 20)
    manifest = prepare(settings, tmp_path / "out", code_point_tokenizer, progress=False)
    (source,) = manifest["sources"]
    assert source["spec"] == "prose" and source["documents"] == len(documents)
    train_docs = _decode_split(tmp_path / "out", code_point_tokenizer, "train")
    val_docs = _decode_split(tmp_path / "out", code_point_tokenizer, "val")
    assert sorted(train_docs + val_docs) == sorted(documents)
    # By name on the command line, in a weighted mixture: its share of the budget by weight.
    notes = write_jsonl(tmp_path / "notes.jsonl", topic_documents(200))
    code, err = _prepare_cli(capsys, "--source", "prose@3", "--source", f"{notes}@1", "--budget-tokens", 4000,
                             "--tokenizer", prepared_data / "tokenizer", "--val-fraction", 0.5, "--out", tmp_path / "cli")
    assert code == 0, err
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    from tablefree.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared_data / "tokenizer")
    longest = max(len(tokenizer.encode(doc, add_special_tokens=False)) + 1 for doc in documents)
    (prose, notes_count) = manifest["sources"]
    assert prose["spec"] == "prose" and not prose["exhausted"]  # whole documents up to its share, no further
    assert 3000 <= prose["train_tokens"] < 3000 + longest and notes_count["train_tokens"] >= 1000


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
    assert (manifest["dtype"], manifest["separator_id"], manifest["separator_token"]) == ("uint16", EOS_ID, "</s>")
    for shard in manifest["shards"]:
        assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]


def test_a_special_tokens_spelling_in_a_document_is_text(tmp_path, code_point_tokenizer):
    """A document that quotes "</s>" or "<s>" keeps those characters: only the separator between documents is the
    end-of-text id, so no document ends early or opens another, and decoding gives back every document."""
    texts = ["The tag </s> closes a sentence; <s> opens one.", "plain text", "<pad><unk></s>", "</s>"]
    source = write_jsonl(tmp_path / "quoting.jsonl", texts)
    prepare(PrepareSettings(sources=[Source(str(source))], val_fraction=0.5), tmp_path / "out", code_point_tokenizer,
            progress=False)
    ids = np.concatenate([_split_ids(tmp_path / "out", split) for split in ("train", "val")])
    special = set(code_point_tokenizer.all_special_ids)
    assert [i for i in ids.tolist() if i in special] == [EOS_ID] * len(texts)
    docs = [d for split in ("train", "val") for d in _decode_split(tmp_path / "out", code_point_tokenizer, split)]
    assert sorted(docs) == sorted(texts)
    assert code_point_tokenizer.backend_tokenizer.encode_special_tokens is False  # the tokenizer itself is untouched


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

    real_write, writes = files.write_atomic, []

    def write_then_crash(path, payload):
        if path.suffix == ".bin" and len(writes) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half way
        writes.append(path.name)
        real_write(path, payload)

    monkeypatch.setattr(files, "write_atomic", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(settings, tmp_path / "resumed", code_point_tokenizer, progress=False)
    assert (tmp_path / "resumed" / "progress.json").exists() and not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(TableFreeError, match="interrupted"):
        TokenShards(tmp_path / "resumed", "train")
    monkeypatch.setattr(files, "write_atomic", real_write)
    resumed = prepare(settings, tmp_path / "resumed", code_point_tokenizer, progress=False)
    assert resumed == reference  # counts, shards and everything the manifest records
    for shard in reference["shards"]:
        assert (tmp_path / "ref" / shard["file"]).read_bytes() == (tmp_path / "resumed" / shard["file"]).read_bytes()


def test_clear_errors(tmp_path, code_point_tokenizer):
    with pytest.raises(TableFreeError, match="no such file"):
        prepare(PrepareSettings(sources=[Source(str(tmp_path / "missing.jsonl"))]), tmp_path / "o1", code_point_tokenizer, progress=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  \n "])
    with pytest.raises(TableFreeError, match=r"the corpus is empty.*2 empty documents"):
        prepare(PrepareSettings(sources=[Source(str(empty))]), tmp_path / "o2", code_point_tokenizer, progress=False)
    with pytest.raises(TableFreeError, match="budget"):
        prepare(PrepareSettings(sources=[parse_source("a.jsonl@2"), parse_source("b.jsonl@1")]), tmp_path / "o3", code_point_tokenizer)
    with pytest.raises(TableFreeError, match="weight"):
        parse_source("a.jsonl@heavy")


def test_a_file_name_that_is_not_utf8_is_named(tmp_path, code_point_tokenizer):
    corpus = write_jsonl(tmp_path / os.fsdecode(b"\xff.jsonl"), topic_documents(20))
    with pytest.raises(TableFreeError, match="is not valid UTF-8 text, and the manifest records it"):
        prepare(PrepareSettings(sources=[Source(str(corpus))]), tmp_path / "d", code_point_tokenizer, progress=False)


@pytest.mark.parametrize("weight", ["inf", "-inf", "nan", "1e309", "-1", "0"])
def test_weights_must_be_positive_and_finite(weight):
    with pytest.raises(TableFreeError, match=rf"source 'notes.jsonl@{weight}': the weight must be a positive finite number"):
        parse_source(f"notes.jsonl@{weight}")


def test_undecodable_text_names_the_byte_or_is_replaced_and_counted(tmp_path, prepared_data, capsys):
    tok = prepared_data / "tokenizer"
    good = "\n\n".join(topic_documents(30)) + "\n\n"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(good.encode() + "Café au lait, naïve.\n".encode("latin-1"))
    line = good.count("\n") + 1
    offset = len(good.encode()) + 3
    code, err = _prepare_cli(capsys, "--source", latin1, "--tokenizer", tok, "--out", tmp_path / "d")
    assert code == 2 and f"{latin1} line {line:,}: invalid UTF-8 at byte {offset:,}" in err and "--bad-text replace" in err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    code, err = _prepare_cli(capsys, "--source", binary, "--tokenizer", tok, "--out", tmp_path / "b")
    assert code == 2 and "invalid UTF-8 at byte 128" in err

    # The corrected command, into the same --out as the failed one.
    code, _ = _prepare_cli(capsys, "--source", latin1, "--tokenizer", tok, "--out", tmp_path / "d", "--bad-text", "replace",
                           "--val-fraction", "0.2")
    assert code == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["replaced_characters"] == 2 and manifest["sources"][0]["replaced_characters"] == 2
    assert manifest["settings"]["bad_text"] == "replace"


def test_malformed_records_name_the_line_or_are_skipped_and_counted(tmp_path, prepared_data, capsys):
    tok = prepared_data / "tokenizer"
    texts = topic_documents(40)
    lines = [json.dumps({"text": t}) for t in texts]
    bad = {5: '{"text": "unterminated', 9: '{"text": 42}', 12: '{"body": "no text field"}', 15: "[1, 2]",
           18: "[" * 100_000, 21: '{"text": "lone \\ud800 surrogate"}', 24: '{"text": null}'}
    for number, line in bad.items():
        lines.insert(number - 1, line)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(lines) + "\n\n")
    code, err = _prepare_cli(capsys, "--source", corpus, "--tokenizer", tok, "--out", tmp_path / "d")
    assert code == 2 and f"{corpus} line 5: not valid JSON" in err and "--bad-records skip" in err
    code, err = _prepare_cli(capsys, "--source", corpus, "--tokenizer", tok, "--out", tmp_path / "d", "--bad-records", "skip")
    assert code == 2 and f"{corpus} line 21: the text holds a lone surrogate (U+D800" in err
    code, err = _prepare_cli(capsys, "--source", corpus, "--tokenizer", tok, "--out", tmp_path / "d", "--bad-records", "skip",
                             "--bad-text", "replace", "--val-fraction", "0.2")
    assert code == 0, err
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    source = manifest["sources"][0]
    assert (source["skipped_records"], source["replaced_characters"], source["empty_documents"]) == (5, 1, 1)
    assert source["documents"] == len(texts) + 1  # the repaired line 21 is a document


def test_parquet_problems_are_named(tmp_path, prepared_data, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = prepared_data / "tokenizer"
    whole = _parquet(tmp_path / "whole.parquet", topic_documents(50))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code, err = _prepare_cli(capsys, "--source", truncated, "--tokenizer", tok, "--out", tmp_path / "d")
    assert code == 2 and f"cannot read {truncated} as Parquet" in err
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    code, err = _prepare_cli(capsys, "--source", numbers, "--tokenizer", tok, "--out", tmp_path / "d")
    assert code == 2 and "the 'text' column of" in err and "holds int64, not strings" in err
    code, err = _prepare_cli(capsys, "--source", whole, "--tokenizer", tok, "--out", tmp_path / "d", "--text-field", "body")
    assert code == 2 and "has no 'body' column (its columns: text)" in err
    code, err = _prepare_cli(capsys, "--source", whole, "--tokenizer", tok, "--out", tmp_path / "d", "--val-fraction", "0.2")
    assert code == 0, err


def test_output_directory_rules(tmp_path, prepared_data, capsys):
    tok = prepared_data / "tokenizer"
    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(40))
    base = ["--source", corpus, "--tokenizer", tok, "--val-fraction", "0.2"]
    (tmp_path / "file").write_text("not a directory")
    code, err = _prepare_cli(capsys, *base, "--out", tmp_path / "file")
    assert code == 2 and "is a file, not a directory" in err
    code, err = _prepare_cli(capsys, *base, "--out", tmp_path)
    assert code == 2 and "would be written over or around the input" in err
    code, err = _prepare_cli(capsys, *base, "--out", tok / "data")
    assert code == 2 and "lies inside the input" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = _prepare_cli(capsys, *base, "--out", mine)
    assert code == 2 and "--force" in err
    assert _prepare_cli(capsys, *base, "--out", mine, "--force")[0] == 0
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "manifest.json").is_file()


def test_read_only_output_directory(tmp_path, prepared_data, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(40))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        locked = Path("/sys")
    code, err = _prepare_cli(capsys, "--source", corpus, "--tokenizer", prepared_data / "tokenizer", "--out", locked / "d")
    # Its lock, beside it, is the first thing a command writes: an error of the environment (exit status 1).
    assert code == 1 and f"could not write the lock {locked / '.d.tablefree-lock'} of the output directory {locked / 'd'}: " in err
    assert not (locked / "d").exists()


def test_settings_changes_need_force_and_force_replaces_only_its_own_files(tmp_path, prepared_data, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(40))
    args = ["--source", corpus, "--tokenizer", prepared_data / "tokenizer", "--out", tmp_path / "d", "--val-fraction"]
    assert _prepare_cli(capsys, *args, "0.2")[0] == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert _prepare_cli(capsys, *args, "0.2")[0] == 0  # prepared already: a no-op with the same settings
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == manifest
    code, err = _prepare_cli(capsys, *args, "0.3")
    assert code == 2 and "other settings (val_fraction differ)" in err and "--force" in err
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == manifest
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    assert _prepare_cli(capsys, *args, "0.3", "--force")[0] == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["settings"]["val_fraction"] == 0.3
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep me"


def test_damaged_manifest_or_progress_is_a_clear_error(tmp_path, prepared_data, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", topic_documents(40))
    out = tmp_path / "d"
    args = ["--source", corpus, "--tokenizer", prepared_data / "tokenizer", "--out", out, "--val-fraction", "0.2"]
    assert _prepare_cli(capsys, *args)[0] == 0
    good = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(good[: len(good) // 2])
    with pytest.raises(TableFreeError, match="data manifest .* cannot be read"):
        TokenShards(out, "train")
    code, err = _prepare_cli(capsys, *args)
    assert code == 2 and "damaged" in err and "--force" in err
    manifest = json.loads(good)
    for damage in ({"shards": 5}, {"shards": [{"file": "../../etc/passwd", "split": "train", "tokens": 1}]},
                   {"dtype": "uint8"}, {"format": 99}):
        (out / "manifest.json").write_text(json.dumps({**manifest, **damage}))
        with pytest.raises(TableFreeError, match="is damaged"):
            TokenShards(out, "train")
    assert _prepare_cli(capsys, *args, "--force")[0] == 0
    assert TokenShards(out, "train").tokens > 0
    (out / "manifest.json").unlink()
    (out / "progress.json").write_text("[1, 2")
    code, err = _prepare_cli(capsys, *args)
    assert code == 2 and "preparation progress file" in err and "--force" in err


def test_a_failed_run_never_blocks_the_next(tmp_path, prepared_data, capsys, code_point_tokenizer):
    tok = prepared_data / "tokenizer"
    good = write_jsonl(tmp_path / "good.jsonl", topic_documents(120))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": 7}\n')
    out = tmp_path / "d"
    args = ["--source", good, "--source", broken, "--tokenizer", tok, "--out", out, "--val-fraction", "0.2", "--shard-tokens", "2000"]
    code, err = _prepare_cli(capsys, *args)
    assert code == 2 and f"{broken} line 2" in err
    state = json.loads((out / "progress.json").read_text())
    assert state["shards"] and "failed" in state  # the first source's shards are written; the run failed on the second
    assert _prepare_cli(capsys, *args[:2], *args[4:])[0] == 0  # the corrected command, same --out, no --force
    assert json.loads((out / "manifest.json").read_text())["sources"][0]["spec"] == str(good)

    # An interrupted run (not a failed one) holds work: other settings over it need --force.
    settings = PrepareSettings(sources=[Source(str(good))], val_fraction=0.2, shard_tokens=2000)
    shutil.rmtree(out)
    real_write = files.write_atomic

    def interrupt(path, payload):
        if path.name == "train-00002.bin":
            raise KeyboardInterrupt
        real_write(path, payload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "write_atomic", interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare(settings, out, code_point_tokenizer, progress=False)
    with pytest.raises(TableFreeError, match="unfinished preparation with other settings.*--force"):
        prepare(PrepareSettings(sources=[Source(str(good))], val_fraction=0.3), out, code_point_tokenizer, progress=False)
    assert prepare(PrepareSettings(sources=[Source(str(good))], val_fraction=0.3), out, code_point_tokenizer,
                   progress=False, force=True)["settings"]["val_fraction"] == 0.3


def test_a_long_single_line_is_encoded_in_bounded_pieces_with_the_same_ids(tmp_path, code_point_tokenizer):
    from pydoc_data.topics import topics

    words = " ".join(" ".join(topics.values()).split())
    size = 2 * BATCH_CHARS + PIECE_CHARS
    line = (words * (size // len(words) + 1))[:size]
    groups = list(piece_groups([line, "a second document"]))
    calls = [sum(len(piece) for _, piece in group) for group in groups]
    assert len(groups) >= 3 and max(calls) <= BATCH_CHARS  # what one tokenizer call holds, so its memory, is bounded
    assert max(len(piece) for group in groups for _, piece in group) <= PIECE_CHARS
    assert "".join(piece for group in groups for owner, piece in group if owner == 0) == line

    short = line[: 3 * PIECE_CHARS]
    (ids,) = encode_documents(code_point_tokenizer.backend_tokenizer, [short], np.dtype("<u2"))
    assert ids.tolist() == code_point_tokenizer.backend_tokenizer.encode(short, add_special_tokens=False).ids
    text = tmp_path / "one-line.txt"
    text.write_text(short + "\n\n" + "a short second document\n")
    prepare(PrepareSettings(sources=[Source(str(text))], val_fraction=0.5, seed=0), tmp_path / "d", code_point_tokenizer, progress=False)
    docs = _decode_split(tmp_path / "d", code_point_tokenizer, "train") + _decode_split(tmp_path / "d", code_point_tokenizer, "val")
    assert docs == [short, "a short second document"]


@pytest.mark.slow
def test_peak_memory_for_a_50_mb_single_line_stays_under_1_gb(tmp_path, prepared_data):
    from pydoc_data.topics import topics

    words = " ".join(" ".join(topics.values()).split()).encode()
    corpus = tmp_path / "line.txt"
    with open(corpus, "wb") as handle:
        for _ in range(50 * 2**20 // len(words) + 1):
            handle.write(words + b" ")
        handle.write(b"\n\na second document\n")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report this big test process's size.
    measure = ("import re, sys; from tablefree.cli import main; code = main(sys.argv[1:]); "
               "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", measure, "data", "prepare", "--source", str(corpus), "--tokenizer",
                           str(prepared_data / "tokenizer"), "--out", str(tmp_path / "d"), "--quiet", "--val-fraction", "0.5",
                           "--seed", "0"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    assert peak_kib < 2**20, f"peak RSS {peak_kib / 2**10:.0f} MiB"


@pytest.mark.parametrize("words", [999, 70_000])
def test_any_tokenizer_width_and_separator_prepare_and_train(tmp_path, words):
    from tablefree.evaluate import evaluate_model
    from tablefree.train import make_config, train

    tokenizer = word_tokenizer(words)
    vocab_size = words + 2
    docs = word_documents(200, words)
    corpus = write_jsonl(tmp_path / "w.jsonl", docs)
    manifest = prepare(PrepareSettings(sources=[Source(str(corpus))], val_fraction=0.1, shard_tokens=4000),
                       tmp_path / "data", tokenizer, progress=False)
    wide = vocab_size > 1 << 16
    assert (manifest["dtype"], manifest["separator_id"], manifest["separator_token"]) == (
        "uint32" if wide else "uint16", words + 1, "</s>")
    for shard in manifest["shards"]:
        assert (tmp_path / "data" / shard["file"]).stat().st_size == (4 if wide else 2) * shard["tokens"]
    ids = _split_ids(tmp_path / "data", "train").tolist() + _split_ids(tmp_path / "data", "val").tolist()
    expected = [i for doc in docs for i in tokenizer.encode(doc, add_special_tokens=False) + [words + 1]]
    assert sorted(ids) == sorted(expected) and max(ids) == words + 1  # every id intact, none wrapped
    assert _split_ids(tmp_path / "data", "train").tolist() == [
        i for n, doc in enumerate(docs) if not is_validation(0, n, 0.1, 0)
        for i in tokenizer.encode(doc, add_special_tokens=False) + [words + 1]]

    # V and the special ids follow from the data's tokenizer: no model.vocab_size needed, and eos is its own.
    result = train(make_config(train_overrides(tmp_path / "data", tmp_path / "run", max_steps=3, eval_tokens=256)))
    assert np.isfinite(result["val_loss"])
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (saved["vocab_size"], saved["eos_token_id"]) == (vocab_size, words + 1)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(f"{docs[0]}\n\n{docs[1]}\n")
    scores = evaluate_model(str(tmp_path / "run" / "model"), str(held_out), seq_len=16)
    assert scores["tokens"] == len(tokenizer.encode(docs[0] + " " + docs[1], add_special_tokens=False)) + 1


def test_ids_too_wide_for_the_shards_are_an_error_never_wrapped():
    big = word_tokenizer(70_000)
    with pytest.raises(TableFreeError, match="produced id 69,999, beyond the uint16 shards"):
        encode_documents(big.backend_tokenizer, ["w1 w69999"], np.dtype("<u2"))


def test_a_tokenizer_without_eos_needs_one_named(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(300)} | {"[UNK]": 300, "<|endoftext|>": 301}
    bare = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bare.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "w.jsonl", word_documents(40, 300))
    args = ["--source", corpus, "--tokenizer", tmp_path / "tokenizer.json", "--out", tmp_path / "d", "--val-fraction", "0.2"]
    code, err = _prepare_cli(capsys, *args)
    assert code == 2 and "has no end-of-text token (eos_token)" in err and "--eos-token" in err
    code, err = _prepare_cli(capsys, *args, "--eos-token", "</s>")
    assert code == 2 and "--eos-token '</s>' is not a token of the tokenizer" in err
    assert _prepare_cli(capsys, *args, "--eos-token", "<|endoftext|>")[0] == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert (manifest["separator_id"], manifest["separator_token"]) == (301, "<|endoftext|>")
    from tablefree.tokenizer import load_tokenizer

    assert load_tokenizer(tmp_path / "d" / "tokenizer").eos_token_id == 301  # training and serving see it too


def test_format_1_manifests_read_as_uint16(prepared_data, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared_data, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for key in ("dtype", "separator_id", "separator_token"):
        del manifest[key]
    manifest["format"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert np.array_equal(TokenShards(old, "val").arrays[0], TokenShards(prepared_data, "val").arrays[0])


class _Listener:
    """A local TCP port that counts the connections made to it (a stand-in address for the Hub)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.fixture
def online(monkeypatch):
    """Offline mode off (the tests run offline), with the Hub's address a local port that counts connections."""
    import datasets.config
    import huggingface_hub.constants

    listener = _Listener()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", listener.url)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", listener.url)
    yield listener
    listener.socket.close()


def test_hub_sources_offline_say_what_to_do(tmp_path, code_point_tokenizer):
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(TableFreeError, match="offline mode is on .*--from-cache.*HF_HUB_OFFLINE"):
        prepare(PrepareSettings(sources=[Source("hf:owner/name:default")]), tmp_path / "o", code_point_tokenizer, progress=False)
    with pytest.raises(TableFreeError, match="not a dataset name"):
        prepare(PrepareSettings(sources=[Source("hf:../../etc")]), tmp_path / "o", code_point_tokenizer, progress=False)


def test_an_unreachable_hub_is_named_at_once(tmp_path, code_point_tokenizer, online):
    online.socket.close()  # nothing listens there now: every connection is refused, as with no network
    with pytest.raises(TableFreeError, match="cannot reach the Hugging Face Hub.*HF_HUB_OFFLINE=1.*--from-cache"):
        prepare(PrepareSettings(sources=[Source("hf:owner/name")]), tmp_path / "o", code_point_tokenizer, progress=False)


def test_from_cache_reads_the_local_datasets_cache_and_never_the_network(tmp_path, code_point_tokenizer, online, monkeypatch):
    import datasets.config
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    missing = PrepareSettings(sources=[Source("hf:owner/name:default", streaming=False)], val_fraction=0.2)
    with pytest.raises(TableFreeError, match="not in the local datasets cache.*without --from-cache"):
        prepare(missing, tmp_path / "o", code_point_tokenizer, progress=False)

    # The layout load_dataset leaves for hub dataset owner/name, config default.
    texts = topic_documents(40)
    builder = Json(cache_dir=str(cache), dataset_name="name", config_name="default", hash="0" * 16,
                   data_files={"train": str(write_jsonl(tmp_path / "n.jsonl", texts))})
    builder.download_and_prepare()
    (cache / "name").rename(cache / "owner___name")
    (config_dir,) = (cache / "owner___name").iterdir()
    config_dir.rename(cache / "owner___name" / "default")
    manifest = prepare(missing, tmp_path / "o", code_point_tokenizer, progress=False)
    assert manifest["sources"][0]["documents"] == len(texts)
    assert online.connections == 0
