"""Generated ids -> text as it grows: incremental decoding and stop strings that never leak into a stream.

Text is held back only while it may begin a stop string or while the ids' bytes stop part-way through a character;
a token whose text is U+FFFD is text (docs/safety.md).
"""

from __future__ import annotations

import codecs
import json
import re


class IncrementalText:
    """Decodes one sequence's output token by token; holds back any tail that may begin a stop string, and ids that
    end part-way through a character until it is whole."""

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self._prefix = 0  # decode from here so multi-token characters and merges come out whole
        self._read = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Append one id; returns (new text safe to emit, whether a stop string was hit)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not (after.endswith("\ufffd") and self._inside_a_character()):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        if self._stopped():
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def finish(self) -> str:
        """The rest of the text once the sequence ends without hitting a stop string, held ids included: a character
        they cut short comes out as the tokenizer decodes it (U+FFFD), and still ends the text at a stop string."""
        self.text += self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        self._prefix = self._read = len(self.ids)
        self._stopped()
        return self._release(len(self.text))

    def _inside_a_character(self) -> bool:
        """Whether the undecided ids end part-way through a character: then their trailing U+FFFD is not text yet."""
        return ends_inside_a_character(self.tokenizer, self.ids[self._prefix :], self.skip_special_tokens)

    def _stopped(self) -> bool:
        """Cuts the text at the first stop string in it, if any; whether there was one."""
        if not self.stop:
            return False
        # Only the new text (plus the longest stop string's reach) can contain a new match.
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _held(self) -> int:
        """Length of the longest suffix of the unreleased text that is a proper prefix of some stop string."""
        # No stop-string prefix straddles what was released (it would have been held), so only the unreleased tail
        # is searched: a long stop string then costs one sequence little, and the batch it shares nothing.
        unreleased = len(self.text) - self.emitted
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, unreleased), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


# ---- which ids end part-way through a character ----
def ends_inside_a_character(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> bool:
    """Whether the bytes that `ids` stand for stop part-way through a UTF-8 character (later ids may complete it).

    Only pieces that are bytes can: a byte-level BPE's (GPT-2's alphabet) and byte-fallback pieces (<0xE2>).
    Any other piece is whole characters, and a U+FFFD among them is a character like any other.
    """
    data = piece_bytes(tokenizer, ids, skip_special_tokens)
    if data is None:
        return False
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    return bool(decoder.getstate()[0])  # the bytes it keeps for the next call: a character begun, not ended


def piece_bytes(tokenizer, ids: list[int], skip_special_tokens: bool) -> bytes | None:
    """The bytes of the ids' pieces as the tokenizer's decoder reads them; None when its pieces are never bytes."""
    kinds = decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds or hasattr(tokenizer, "byte_decoder")  # a Python GPT-2 tokenizer has the map
    byte_fallback = "ByteFallback" in kinds or hasattr(tokenizer, "sp_model")  # SentencePiece's <0xE2> pieces
    if not (byte_level or byte_fallback):
        return None
    data = bytearray()
    for piece in tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens):
        if piece is None:  # an id past the tokenizer's vocabulary (a model's may be larger) decodes to nothing
            continue
        byte = BYTE_PIECE.fullmatch(piece) if byte_fallback else None
        if byte:
            data.append(int(byte.group(1), 16))
            continue
        for char in piece:  # a character outside the alphabet (an added token's) stands for its own UTF-8
            byte_value = BYTE_LEVEL_ALPHABET.get(char) if byte_level else None
            data += char.encode("utf-8", "surrogatepass") if byte_value is None else bytes([byte_value])
    return bytes(data)


def decoder_kinds(tokenizer) -> set[str]:
    """The decoder types of a fast tokenizer's backend (a Sequence's parts too); empty for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    kinds, todo = set(), [json.loads(decoder.__getstate__())]
    while todo:
        spec = todo.pop()
        kinds.add(spec.get("type"))
        todo.extend(spec.get("decoders") or [])
    return kinds


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (transformers' own table, inverted)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


BYTE_LEVEL_ALPHABET = byte_level_alphabet()
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
