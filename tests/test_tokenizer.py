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
