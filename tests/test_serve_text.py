"""Incremental decoding (serve/text.py) with the three kinds of tokenizer a model may bring: the code-point
tokenizer (pieces are characters), a byte-level BPE (pieces are bytes in GPT-2's alphabet) and a SentencePiece-style
BPE with byte fallback (<0xE6> pieces). A U+FFFD the model generates is text; bytes that stop part-way through a
character are held until the character is complete, and whatever is held when the sequence ends still comes out."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tablefree.serve.text import IncrementalText

# Real U+FFFD characters beside multi-byte ones (2, 3 and 4 bytes in UTF-8), at the start, in the middle and last.
TEXTS = ["\ufffd", "\ufffd\ufffd\ufffd\ufffd\ufffd", "a\ufffd\u65e5\ufffd\ufffd\u00e9\U0001F600x\ufffd",
         "\u65e5\u672c\u8a9e \ufffd", "\U0001F600\ufffd\U0001F600"]


def byte_level_bpe():
    """A byte-level BPE trained with `tokenizers`, as `tablefree tokenizer` users bring one (GPT-2's byte alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["</s>"], show_progress=False)
    bpe.train_from_iterator(["h\u00e9llo w\u00f6rld \ufffd\ufffd \u65e5\u672c\u8a9e \U0001F600 "] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def byte_fallback_bpe():
    """A SentencePiece-style BPE (Llama's layout): a few characters, U+FFFD among them, and <0x00>..<0xFF> for the rest."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for char in "abx \ufffd\u00e9":
        vocab[char] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    bpe.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


KINDS = ("code-point", "byte-level", "byte-fallback")


def make_tokenizer(kind: str, code_point_tokenizer):
    return {"code-point": lambda: code_point_tokenizer, "byte-level": byte_level_bpe, "byte-fallback": byte_fallback_bpe}[kind]()


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request, code_point_tokenizer):
    return make_tokenizer(request.param, code_point_tokenizer)


@pytest.fixture(scope="module", params=["code-point", "byte-level"])
def tokenizer_and_ids(request, code_point_tokenizer):
    """A tokenizer whose decoding of a longer list of ids starts with its decoding of a shorter one, and ids to draw
    from: the test texts' pieces and the first few hundred ids (bytes, letters, ...; past the BPE's vocabulary too)."""
    tokenizer = make_tokenizer(request.param, code_point_tokenizer)
    return tokenizer, sorted(set(tokenizer.encode("".join(TEXTS), add_special_tokens=False)) | set(range(330)))


# Every tokenizer with every text it can spell: the code-point one has no pieces beyond the BMP (no emoji).
CASES = [(kind, text) for kind in KINDS for text in TEXTS
         if kind != "code-point" or all(ord(char) < 0x10000 for char in text)]


@pytest.fixture(scope="module")
def tokenizers(code_point_tokenizer):
    return {kind: make_tokenizer(kind, code_point_tokenizer) for kind in KINDS}


def encoded(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text, "every case's text is one its tokenizer spells exactly"
    return ids


def released(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], bool]:
    """What a stream hands out for `ids`: each add's piece (then finish's, unless a stop string ended it), and the hit."""
    text = IncrementalText(tokenizer, stop)
    pieces = []
    for token in ids:
        piece, hit = text.add(token)
        pieces.append(piece)
        if hit:
            return pieces, True
    return [*pieces, text.finish()], False


@pytest.mark.parametrize("kind, text", CASES)
def test_a_generated_u_fffd_is_text(tokenizers, kind, text):
    tokenizer = tokenizers[kind]
    ids = encoded(tokenizer, text)
    pieces, _ = released(tokenizer, ids, [])
    assert "".join(pieces) == text
    assert pieces[-1] == ""  # nothing was held to the end: the last U+FFFD came out with its token
    pieces, hit = released(tokenizer, ids, ["\ufffd"])
    assert hit and "".join(pieces) == text[: text.index("\ufffd")]


@pytest.mark.parametrize("kind, text", CASES)
def test_a_character_split_across_byte_pieces_is_held_until_complete(tokenizers, kind, text):
    """Each piece handed out is whole text: never a U+FFFD that a later byte turns into another character."""
    tokenizer = tokenizers[kind]
    ids = encoded(tokenizer, text)
    pieces, _ = released(tokenizer, ids, [])
    for count in range(1, len(pieces) + 1):
        assert text.startswith("".join(pieces[:count])), (pieces, count)
    if tokenizer.decode(ids[:1]) != text[:1]:  # the first character takes several pieces: the first ones hand out ""
        assert pieces[0] == ""


def test_a_character_cut_short_at_the_end_comes_out_as_the_tokenizer_decodes_it():
    tokenizer = byte_level_bpe()
    cut_short = [tokenizer.convert_tokens_to_ids(piece) for piece in ("\u00e6", "\u0139")]  # b"\xe6\x97" of 3 bytes
    pieces, hit = released(tokenizer, tokenizer.encode("x", add_special_tokens=False) + cut_short, [])
    assert pieces == ["x", "", "", "\ufffd"] and not hit and tokenizer.decode(cut_short) == "\ufffd"
    pieces, hit = released(tokenizer, cut_short, ["\ufffd"])
    assert "".join(pieces) == ""


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_any_text_streams_out_whole(tokenizer, data):
    """Random text of U+FFFD, ASCII and multi-byte characters (each one this tokenizer holds), then a character cut
    short: the pieces join to the text, each final when handed out; a stop string ends it at its first occurrence."""
    alphabet = [c for c in "ab \ufffd\u00e9\u00f6\u65e5\u8a9e\U0001F600" if tokenizer.decode(tokenizer.encode(c, add_special_tokens=False)) == c]
    text = data.draw(st.text(st.sampled_from(alphabet), min_size=1, max_size=12))
    ids = tokenizer.encode(text, add_special_tokens=False)
    cut = data.draw(st.sampled_from([[], *(encoded_prefix(tokenizer, c) for c in "\u65e5\U0001F600")]))
    whole = tokenizer.decode(ids + cut)
    assert whole == text + ("\ufffd" if cut else "")
    check_stream(tokenizer, ids + cut, whole, data.draw(st.sampled_from(["\ufffd", "\u00e9", "a\ufffd"])))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_any_ids_stream_out_as_the_tokenizer_decodes_them(tokenizer_and_ids, data):
    """Random ids, byte pieces among them (lone lead and continuation bytes, characters cut short anywhere): the
    stream's pieces join to the tokenizer's own decoding of the ids. (A byte-fallback decoder turns a whole run of byte
    pieces into U+FFFDs once one of them is invalid, text a stream may already have handed out: not checked there.)"""
    tokenizer, pool = tokenizer_and_ids
    ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=12))
    check_stream(tokenizer, ids, tokenizer.decode(ids, skip_special_tokens=True),
                 data.draw(st.sampled_from(["\ufffd", "\u00e9", "x\ufffd"])))


def check_stream(tokenizer, ids: list[int], whole: str, stop: str) -> None:
    pieces, _ = released(tokenizer, ids, [])
    assert "".join(pieces) == whole, (ids, pieces)
    for count in range(1, len(pieces)):
        assert whole.startswith("".join(pieces[:count])), (ids, pieces)
    pieces, _ = released(tokenizer, ids, [stop])
    assert "".join(pieces) == whole.split(stop)[0], (ids, stop, pieces)


def encoded_prefix(tokenizer, char: str) -> list[int]:
    """The ids of `char` less its last byte piece, where the tokenizer spells it in byte pieces; none otherwise."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    return ids[:-1] if len(ids) > 1 and tokenizer.decode(ids[:-1]) == "\ufffd" else []
