import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tablefree.tokenizer import (
    BOS_ID,
    EOS_ID,
    NGRAM_SLOTS,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    has_slot,
    special_tokens,
    unknown_characters,
)

slotted_chars = st.characters(min_codepoint=0, max_codepoint=0xFFFF).filter(has_slot)


def test_layout_matches_the_published_tokenizer(code_point_tokenizer):
    tok = code_point_tokenizer
    assert len(tok) == 65_536
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (57344, 57345, 57346, 57347)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (57344, 57345, 57346, 57347)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(name) == 0xE000 + i
    assert special_tokens()["<special_token_255>"] == 0xE0FF
    assert len(NGRAM_SLOTS) == 8192 and NGRAM_SLOTS[0] == 0xD800 and NGRAM_SLOTS[-1] == 0xF8FF


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=slotted_chars, max_size=60))
def test_round_trip_is_exact_for_any_text_whose_characters_have_slots(code_point_tokenizer, text):
    ids = code_point_tokenizer.encode(text)
    assert code_point_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(slotted_chars)
def test_a_single_character_is_its_own_code_point(code_point_tokenizer, char):
    assert code_point_tokenizer.encode(char) == [ord(char)]


def test_ngram_slots_hold_frequent_ngrams_and_shorten_the_text(code_point_tokenizer):
    text = "The function returns the value of the object."
    ids = code_point_tokenizer.encode(text)
    assert len(ids) < len(text) / 2
    assert any(0xD800 <= i < 0xE000 or 0xE100 <= i < 0xF900 for i in ids)
    assert code_point_tokenizer.decode(ids) == text


def test_characters_without_a_slot_become_unk_and_are_reported(code_point_tokenizer):
    text = "smile \U0001F600 and \ue123 private"
    ids = code_point_tokenizer.encode(text)
    assert ids.count(UNK_ID) == 2
    assert code_point_tokenizer.decode(ids) == "smile <unk> and <unk> private"
    assert unknown_characters(text) == {"\U0001F600": 1, "\ue123": 1}


def test_saved_tokenizer_loads_with_autotokenizer_without_remote_code(code_point_tokenizer, tmp_path):
    code_point_tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Question: What is the capital of UK?\nAnswer:" + string.printable
    assert loaded.encode(text) == code_point_tokenizer.encode(text)
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "[USER]hi[EOT][ASSISTANT]"


def test_tokenizer_build_cli_from_a_local_file(tmp_path):
    from tablefree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the cat sat on the mat. " * 50 + "\n\n") * 20)
    assert main(["tokenizer", "build", "--corpus", str(corpus), "--out", str(tmp_path / "tok")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tok.encode(" the cat sat on the mat")
    assert len(tok) == 65_536 and len(ids) == 6 and all(i in NGRAM_SLOTS for i in ids)  # one n-gram per word
    assert tok.convert_ids_to_tokens(NGRAM_SLOTS[-1]).startswith("<reserved_0x")
    assert main(["tokenizer", "build", "--corpus", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "x")]) == 2


def test_any_other_tokenizer_sets_v_and_k(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tablefree.cli import main
    from tablefree.hub import load_model

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(["some text to learn a small byte level vocabulary from"] * 50, trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    assert main(["new", "tiny-affine", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    model, tokenizer = load_model(tmp_path / "m")
    assert model.config.vocab_size == bpe.get_vocab_size()
    assert model.get_input_embeddings().code.bits == (bpe.get_vocab_size() - 1).bit_length()


@pytest.mark.parametrize("char", ["\ud7ff", "\uf900", "\uffff", "\x00"])
def test_boundary_characters_keep_their_code_points(code_point_tokenizer, char):
    assert code_point_tokenizer.encode(char) == [ord(char)]


def test_tokenizer_build_refuses_directories_it_did_not_make_and_never_touches_foreign_files(tmp_path, capsys):
    from tablefree.cli import main

    corpus = tmp_path / "corpus" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(("the cat sat on the mat. " * 50 + "\n\n") * 20)
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    def build(*extra):
        capsys.readouterr()
        code = main(["tokenizer", "build", "--corpus", str(corpus), *map(str, extra)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    code, err = build("--out", out)
    assert code == 2 and f"the output directory {out} exists and is not empty" in err and "--force" in err
    for inside in (corpus.parent, corpus, tmp_path):
        code, err = build("--out", inside, "--force")
        assert code == 2 and "input" in err
    assert build("--out", out, "--force")[0] == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(AutoTokenizer.from_pretrained(str(out)).encode(" the cat sat on the mat")) == 6
    code, err = build("--out", out)  # a finished tokenizer is not resumable: rebuilding it is asked for with --force
    assert code == 2 and "earlier tablefree tokenizer output" in err
    (corpus.parent / "more.txt").write_text(("a dog ran in the park. " * 50 + "\n\n") * 20)
    corpus = corpus.parent / "more.txt"
    assert build("--out", out, "--force")[0] == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert len(AutoTokenizer.from_pretrained(str(out)).encode(" a dog ran")) == 3
    assert not [p for p in tmp_path.iterdir() if "tablefree-tmp" in p.name]


def test_tokenizer_build_names_bad_bytes_and_can_replace_them(tmp_path, capsys):
    from tablefree.cli import main

    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(("the cat sat on the mat. " * 50 + "\n\n").encode() + "Café crème\n".encode("latin-1"))
    assert main(["tokenizer", "build", "--corpus", str(corpus), "--out", str(tmp_path / "a")]) == 2
    assert f"{corpus} line 3: invalid UTF-8 at byte 1,205" in capsys.readouterr().err
    assert main(["tokenizer", "build", "--corpus", str(corpus), "--out", str(tmp_path / "b"), "--bad-text", "replace"]) == 0
    assert "2 characters replaced by U+FFFD" in capsys.readouterr().out


@pytest.mark.parametrize("damage", [b"", b"{\"model\": ", b"\x00\xff" * 100, b"[]"], ids=["empty", "truncated", "binary", "array"])
def test_a_damaged_tokenizer_file_is_a_clear_error(tmp_path, damage):
    from tablefree.errors import TableFreeError
    from tablefree.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_bytes(damage)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        with pytest.raises(TableFreeError, match="could not load the tokenizer at"):
            load_tokenizer(path)


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
    """A byte-level BPE of 512 ids, built by the CLI from the first 200,000 characters of the embedded corpus."""
    from tablefree.cli import main

    out = tmp_path_factory.mktemp("bpe") / "tok"
    assert main(["tokenizer", "build", "--vocab-size", "512", "--limit-chars", "200000", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def byte_level(byte_level_dir):
    from tablefree.tokenizer import load_tokenizer

    return load_tokenizer(byte_level_dir)


def test_byte_level_layout_is_bytes_then_special_tokens_then_merges(byte_level):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = byte_level
    assert len(tok) == 512 and len(tok.get_vocab()) == 512
    assert [tok.convert_ids_to_tokens(b) for b in range(256)] == [bytes_to_unicode()[b] for b in range(256)]
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(name) == 256 + i
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (256, 257, 258, None)
    assert tok.encode("A b", add_special_tokens=False)[0] == ord("A")
    assert len(tok.encode(" the", add_special_tokens=False)) == 1
    text = "The function returns the value of the object."
    assert len(tok.encode(text, add_special_tokens=False)) < len(text) / 2
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "[USER]hi[EOT][ASSISTANT]"
    assert tok.encode(chat, add_special_tokens=False)[-1] == tok.convert_tokens_to_ids("[ASSISTANT]")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_byte_level_round_trip_is_exact_for_any_text(byte_level, text):
    ids = byte_level.encode(text, add_special_tokens=False)
    assert byte_level.decode(ids) == text
    assert all(0 <= i < 512 for i in ids)


@pytest.mark.parametrize("text", ["smile \U0001F600 and \ue123 private", "日本語 naïve  \t\n\r x", "\x00\x7f\ufffd"])
def test_byte_level_keeps_every_character_and_needs_no_unk(byte_level, text):
    ids = byte_level.encode(text, add_special_tokens=False)
    assert byte_level.decode(ids) == text and 259 not in ids


def test_byte_level_build_is_deterministic(tmp_path, byte_level_dir):
    from tablefree.cli import main

    again = tmp_path / "again"
    assert main(["tokenizer", "build", "--vocab-size", "512", "--limit-chars", "200000", "--out", str(again)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (byte_level_dir / name).read_bytes()
    other = tmp_path / "other"
    assert main(["tokenizer", "build", "--vocab-size", "513", "--limit-chars", "200000", "--out", str(other)]) == 0
    assert (other / "tokenizer.json").read_bytes() != (byte_level_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("value", ["279", "65537", "0", "-5", "4.5", "many"])
def test_vocab_size_out_of_range_is_one_clear_line(tmp_path, capsys, value):
    from tablefree.cli import main

    args = ["tokenizer", "build", "--vocab-size", value, "--limit-chars", "1000", "--out", str(tmp_path / "t")]
    if value.lstrip("-").isdigit():
        assert main(args) == 2
        line = "--vocab-size must be an integer from 280 to 65,536 (the 256 bytes, 23 special tokens and at least one merge)"
    else:  # argparse's own refusal of a non-integer
        with pytest.raises(SystemExit) as exit_code:
            main(args)
        assert exit_code.value.code == 2
        line = f"argument --vocab-size: invalid int value: '{value}'"
    err = capsys.readouterr().err
    assert "Traceback" not in err and line in err.strip().splitlines()[-1]
    assert not (tmp_path / "t").exists()


def test_a_corpus_too_small_for_the_vocab_size_is_a_clear_error(tmp_path, capsys):
    from tablefree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the cat sat on the mat. " * 50 + "\n\n") * 20)
    assert main(["tokenizer", "build", "--corpus", str(corpus), "--vocab-size", "4096", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "needs 3,817: give a larger corpus or a --vocab-size of at most" in err and "Traceback" not in err
    assert main(["tokenizer", "build", "--corpus", str(corpus), "--vocab-size", "290", "--out", str(tmp_path / "t")]) == 0
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "t"))) == 290
    assert "byte-level BPE tokenizer (V = 290, K = 9 bits)" in capsys.readouterr().out


def test_a_byte_level_tokenizer_works_end_to_end(byte_level_dir, tmp_path, capsys):
    """data prepare, train (tiny), eval, held-out scoring, the unigram baseline and generate, with V = 512 and K = 9."""
    import io
    import json

    import numpy as np
    from training_data import topic_documents, train_overrides, write_jsonl

    from tablefree.cli import main
    from tablefree.compare import score_heldout, unigram_baseline
    from tablefree.data import TokenShards
    from tablefree.evaluate import evaluate_model, token_byte_lengths
    from tablefree.generate import generate_text
    from tablefree.hub import load_model
    from tablefree.train import make_config, train

    corpus = write_jsonl(tmp_path / "topics.jsonl", topic_documents(160))
    data = tmp_path / "data"
    assert main(["data", "prepare", "--source", str(corpus), "--tokenizer", str(byte_level_dir), "--out", str(data),
                 "--val-fraction", "0.1", "--quiet"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert (manifest["dtype"], manifest["separator_id"], manifest["separator_token"]) == ("uint16", 258, "</s>")

    cfg = make_config(train_overrides(data, tmp_path / "run", max_steps=4))
    result = train(cfg)
    model, tokenizer = load_model(tmp_path / "run" / "model")
    assert (model.config.vocab_size, model.get_input_embeddings().code.bits) == (512, 9)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (257, 258, 256)
    assert len(tokenizer) == 512 and tokenizer.chat_template

    lengths = token_byte_lengths(tokenizer, 512)
    for split in ("train", "val"):  # every byte of the text is counted once, the separators not at all
        ids = np.concatenate([np.asarray(a) for a in TokenShards(data, split).arrays])
        assert int(lengths[ids].sum()) == manifest[f"{split}_bytes"]

    again = evaluate_model(str(tmp_path / "run" / "model"), str(data), seq_len=32, max_tokens=512)
    assert again["loss"] == pytest.approx(result["val_loss"], rel=1e-5)
    assert again["bits_per_byte"] == pytest.approx(result["val_bits_per_byte"], rel=1e-5)
    assert 0 < again["bits_per_byte"] < again["loss"] / np.log(2)  # several bytes per token
    assert main(["eval", str(tmp_path / "run" / "model"), "--data", "python-notes", "--max-tokens", "256"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    held = score_heldout(tmp_path / "run" / "model", {"notes": "python-notes"}, cfg)
    assert held["notes"]["bits_per_byte"] > 0 and held["notes"]["tokens"] == cfg.eval_tokens
    baseline = unigram_baseline(cfg, {"notes": "python-notes"})
    assert 0 < baseline["val_bits_per_byte"] < 9 / 1.5  # below a uniform choice among 512 ids at >= 1.5 bytes a token

    text = generate_text(str(tmp_path / "run" / "model"), "The function", max_tokens=6, temperature=0, stream=io.StringIO())
    assert isinstance(text, str)

    capsys.readouterr()
    assert main(["export", str(tmp_path / "run" / "model"), str(tmp_path / "gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the GGUF export supports the code-point tokenizer" in err and "--format gpt-neox" in err
