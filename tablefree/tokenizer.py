"""The tokenizers tablefree builds, saved as a standard tokenizer.json: the code-point tokenizer of the
published checkpoints (the default), and a small byte-level BPE of any vocabulary size (`--vocab-size`).

Layout of the code-point tokenizer's V = 65,536 ids:
- every Basic-Multilingual-Plane character outside the surrogate and private-use ranges has its
  own code point as id, so bin_16 of a one-character token is the character's code point;
- 0xE000-0xE0FF: special tokens (<pad> = 57344, <s>, </s>, <unk>, ...), then <special_token_N>;
- 0xD800-0xDFFF and 0xE100-0xF8FF: 8,192 n-gram slots, filled in order with the merges that
  byte-pair-encoding training on the given corpus learns first (its most frequent adjacent pairs);
  slots the corpus cannot fill hold unused <reserved_0x....> placeholders.
Text is split like GPT-2 (words with their leading space, numbers, punctuation runs, whitespace)
and never normalised, so decoding the ids gives back the text exactly. A character without a slot
(outside the BMP, or in the private-use area U+E000-U+F8FF) becomes <unk> (id 57347): the only loss,
reported by `unknown_characters`.

Layout of the byte-level BPE's V = N ids (N from SMALLEST_BPE to 65,536), as GPT-2's tokenizer works:
- 0-255: the 256 bytes, id = byte value, each written as its symbol in GPT-2's byte-to-unicode
  alphabet (a space byte is 'Ġ');
- 256-278: the special tokens of the code-point layout, in its order (<pad> = 256, <s> = 257,
  </s> = 258, <unk> = 259, ..., [EOT], [USER], [ASSISTANT], ...), so chat works the same way;
- 279 to N - 1: the merged tokens, in the order byte-pair-encoding training on the corpus learns them.
Text is split by GPT-2's regex and turned into its UTF-8 bytes, so every text round-trips and no
id stands for an unknown character (<unk> is kept for the layout, never produced).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .corpus import BUILTIN_CORPORA, ReadOptions
from .errors import TableFreeError, summary

VOCAB_SIZE = 1 << 16
SPECIAL_BASE = 0xE000
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>", "<emotions>", "</emotions>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "[INST]", "[/INST]",
    "[EOT]", "[USER]", "[ASSISTANT]", "[FIM_PREFIX]", "[FIM_MIDDLE]", "[FIM_SUFFIX]", "[FIM_PAD]",
    "[REPO_NAME]", "[FILE_SEP]",
]  # fmt: skip
SPECIAL_END = 0xE100
NGRAM_SLOTS = list(range(0xD800, 0xE000)) + list(range(0xE100, 0xF900))
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0xE000, 0xE001, 0xE002, 0xE003
# transformers' role -> the special token that plays it, in both layouts.
ROLE_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
BYTE_SYMBOLS = 256
SMALLEST_BPE = BYTE_SYMBOLS + len(SPECIAL_TOKENS) + 1  # the bytes, the special tokens and one merge
# What save_pretrained writes into a tokenizer directory.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
SPLIT_PATTERN = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_NO_SLOT = re.compile("[\ue000-\uf8ff\U00010000-\U0010ffff]")
# Chat turns in the layout's own role tokens; the reply ends at [EOT].
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}[USER]{{ message['content'] }}[EOT]"
    "{% elif message['role'] == 'assistant' %}[ASSISTANT]{{ message['content'] }}[EOT]"
    "{% elif message['role'] in ('tool', 'function') %}<tool_response>{{ message['content'] }}</tool_response>"
    "{% else %}{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, developer, user, assistant or tool') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)


def has_slot(char: str) -> bool:
    """Whether a character has its own id (its code point) in the code-point layout."""
    cp = ord(char)
    return cp < 0xD800 or 0xF900 <= cp <= 0xFFFF


def special_tokens() -> dict[str, int]:
    names = SPECIAL_TOKENS + [f"<special_token_{i}>" for i in range(len(SPECIAL_TOKENS), SPECIAL_END - SPECIAL_BASE)]
    return {name: SPECIAL_BASE + i for i, name in enumerate(names)}


def learn_ngrams(texts: Iterable[str], slots: int = len(NGRAM_SLOTS)) -> list[tuple[str, str]]:
    """The first `slots` BPE merges learned on `texts` (characters without a slot are left out)."""
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    documents = 0

    def cleaned():
        nonlocal documents
        for text in texts:
            documents += 1
            yield _NO_SLOT.sub(" ", text)

    # The trainer counts its alphabet in the vocabulary size, so ask for alphabet + slots merges.
    trainer = trainers.BpeTrainer(vocab_size=slots + 70_000, show_progress=False, max_token_length=24)
    trainer_tokenizer.train_from_iterator(cleaned(), trainer=trainer)
    if documents == 0:
        raise TableFreeError("the corpus is empty: no documents to learn n-grams from")
    merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges[:slots]]


def build_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """The code-point tokenizer with its n-gram slots learned from `texts`."""
    merges = learn_ngrams(texts)
    if not merges:
        raise TableFreeError("the corpus has no repeated character pairs to fill n-gram slots; give a larger corpus")
    vocab = {chr(cp): cp for cp in range(VOCAB_SIZE) if has_slot(chr(cp))}
    for slot, (left, right) in zip(NGRAM_SLOTS, merges):
        vocab[left + right] = slot
    for slot in NGRAM_SLOTS[len(merges) :]:
        vocab[f"<reserved_0x{slot:04X}>"] = slot
    specials = special_tokens()
    vocab.update(specials)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>", ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(specials))
    return tokenizer


def check_vocab_size(vocab_size) -> int:
    """`vocab_size` if a byte-level BPE can have it: room for the bytes, the special tokens and a merge, ids in 16 bits."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not SMALLEST_BPE <= vocab_size <= VOCAB_SIZE:
        raise TableFreeError(f"--vocab-size must be an integer from {SMALLEST_BPE} to {VOCAB_SIZE:,} (the 256 bytes, "
                             f"{len(SPECIAL_TOKENS)} special tokens and at least one merge), got {vocab_size!r}")
    return vocab_size


def build_byte_level_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of exactly `vocab_size` ids learned from `texts` (layout in the module docstring)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte-level alphabet

    check_vocab_size(vocab_size)
    wanted = vocab_size - BYTE_SYMBOLS - len(SPECIAL_TOKENS)
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    documents = 0

    def counted():
        nonlocal documents
        for text in texts:
            documents += 1
            yield text

    # The trainer counts the 256 byte symbols in its vocabulary size; the special tokens are placed after them below.
    trainer = trainers.BpeTrainer(vocab_size=BYTE_SYMBOLS + wanted, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tokenizer.train_from_iterator(counted(), trainer=trainer)
    if documents == 0:
        raise TableFreeError("the corpus is empty: no documents to learn merges from")
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({name: BYTE_SYMBOLS + i for i, name in enumerate(SPECIAL_TOKENS)})
    merges = []
    for merge in json.loads(trainer_tokenizer.to_str())["model"]["merges"]:
        if len(vocab) == vocab_size:
            break
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))  # two merges can make the same token; it keeps its first id
    if len(vocab) < vocab_size:
        raise TableFreeError(
            f"the corpus yields {len(vocab) - SMALLEST_BPE + 1:,} merged tokens, but --vocab-size {vocab_size:,} needs "
            f"{wanted:,}: give a larger corpus or a --vocab-size of at most {len(vocab):,}"
        )
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def as_transformers(tokenizer: Tokenizer, model_max_length: int = 1024):
    """Wrap a `tokenizers.Tokenizer` as the transformers fast tokenizer that AutoTokenizer reloads.

    The layouts' special tokens take their roles (pad, bos, eos; unk where the model maps unknown input to it),
    and a tokenizer with the role tokens [USER], [ASSISTANT], [EOT] gets the chat template written in them.
    """
    from transformers import PreTrainedTokenizerFast

    unk = getattr(tokenizer.model, "unk_token", None)
    kwargs = {role: name for role, name in ROLE_TOKENS.items()
              if tokenizer.token_to_id(name) is not None and (role != "unk_token" or unk == name)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **kwargs)
    if all(tokenizer.token_to_id(name) is not None for name in ("[USER]", "[ASSISTANT]", "[EOT]", "<tool_response>")):
        fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str | Path):
    """A tokenizer directory (or a bare tokenizer.json) as a transformers tokenizer; code in the directory never runs."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .hub import refuse_tokenizer_code

    path = Path(path)
    if not path.is_file() and not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise TableFreeError(f"no tokenizer at {path}: expected a directory with tokenizer.json, or a tokenizer.json file")
    if path.is_dir():
        refuse_tokenizer_code(path)
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # tokenizers and transformers raise many types for a damaged file; all mean "cannot load"
        raise TableFreeError(f"could not load the tokenizer at {path}: {summary(exc)}") from None


def end_of_text_id(tokenizer, where: str) -> int:
    """The id that separates documents in prepared data and evaluation: the tokenizer's own end-of-text token."""
    if tokenizer.eos_token_id is None:
        raise TableFreeError(
            f"the tokenizer {where} has no end-of-text token (eos_token) to separate documents with; name one of its "
            f"tokens with --eos-token (for example </s> or <|endoftext|>), or set eos_token in its tokenizer_config.json"
        )
    return tokenizer.eos_token_id


def set_end_of_text(tokenizer, token: str) -> None:
    """Make `token`, which must already be in the vocabulary, the tokenizer's end-of-text token."""
    if token not in tokenizer.get_vocab():
        raise TableFreeError(f"--eos-token {token!r} is not a token of the tokenizer; give one of its special tokens")
    tokenizer.eos_token = token


def text_encoder(tokenizer) -> Tokenizer:
    """A copy of `tokenizer`'s backend that encodes a special token's spelling found in a document ("</s>", "<s>") as
    the text it is: documents are separated by the end-of-text id, never by what they say, so a document that quotes
    "</s>" cannot end itself."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


def tokenizer_hash(tokenizer) -> str:
    """Content hash of what the tokenizer maps (vocabulary, merges, pre-tokenizer): prepared data records it."""
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def unknown_characters(text: str) -> dict[str, int]:
    """Characters of `text` that the code-point layout maps to <unk>, with their counts."""
    counts: dict[str, int] = {}
    for char in _NO_SLOT.findall(text):
        counts[char] = counts.get(char, 0) + 1
    return counts


def build_tokenizer_dir(corpus: list[str], out: str | Path, limit_chars: int | None = None, force: bool = False,
                        text_field: str = "text", options: ReadOptions = ReadOptions(),
                        vocab_size: int | None = None) -> Path:
    """`tablefree tokenizer build`: learn the code-point tokenizer's n-gram slots (or, with `vocab_size`, a byte-level
    BPE of that many ids) from a corpus and save the tokenizer directory."""
    from . import files

    out = Path(out)
    if limit_chars is not None and limit_chars <= 0:
        raise TableFreeError(f"--limit-chars must be positive, got {limit_chars}")
    if vocab_size is not None:
        check_vocab_size(vocab_size)
    with files.output_lock(out, inputs=[Path(c) for c in corpus if c not in BUILTIN_CORPORA]):
        return _build_into(out, corpus, limit_chars, force, text_field, options, vocab_size)


def _build_into(out: Path, corpus: list[str], limit_chars: int | None, force: bool, text_field: str,
                options: ReadOptions, vocab_size: int | None) -> Path:
    from . import files
    from .corpus import ReadCounts, read_corpus

    files.claim_output_dir(out, "tokenizer", resumable=False, force=force, writes=TOKENIZER_FILES,
                           inputs=[Path(c) for c in corpus if c not in BUILTIN_CORPORA])
    counts = {"characters": 0, "unknown": 0}
    read = ReadCounts()

    def counted():
        for text in read_corpus(corpus, limit_chars=limit_chars, text_field=text_field, options=options, counts=read):
            counts["characters"] += len(text)
            if vocab_size is None:
                counts["unknown"] += len(_NO_SLOT.findall(text))
            yield text

    if vocab_size is None:
        fast = as_transformers(build_tokenizer(counted()))
    else:
        fast = as_transformers(build_byte_level_tokenizer(counted(), vocab_size))
    with files.staged_directory(out, "tokenizer") as stage:
        fast.save_pretrained(str(stage.path))
    left_out = [f"{n:,} {what}" for n, what in ((read.replaced_characters, "characters replaced by U+FFFD"),
                                               (read.skipped_records, "records skipped")) if n]
    unknown = f"; {counts['unknown']:,} without a slot (they encode as <unk>)" if vocab_size is None else ""
    print(f"read {counts['characters']:,} characters{unknown}" + (f"; {', '.join(left_out)}" if left_out else ""))
    return out


def tokenizer_build_command(args) -> int:
    options = ReadOptions(bad_text=args.bad_text, bad_records=args.bad_records)
    out = build_tokenizer_dir(args.corpus, args.out, limit_chars=args.limit_chars, force=args.force,
                              text_field=args.text_field, options=options, vocab_size=args.vocab_size)
    if args.vocab_size is None:
        print(f"code-point tokenizer (V = {VOCAB_SIZE:,}) -> {out}")
    else:
        bits = (args.vocab_size - 1).bit_length()
        print(f"byte-level BPE tokenizer (V = {args.vocab_size:,}, K = {bits} bits) -> {out}")
    return 0


def add_cli(subparsers) -> None:
    from .corpus import add_reading_options

    tokenizer = subparsers.add_parser("tokenizer")
    verbs = tokenizer.add_subparsers(dest="tokenizer_command", metavar="VERB", required=True)
    build = verbs.add_parser("build", help="fill the n-gram slots from a corpus (or learn a byte-level BPE) and save "
                                           "tokenizer.json")
    build.add_argument("--corpus", nargs="+", default=["embedded"],
                       help="'embedded' (Python's documentation), 'prose' (English prose shipped with tablefree) or "
                            ".txt/.jsonl/.parquet files")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--vocab-size", type=int, default=None, metavar="N",
                       help=f"learn a byte-level BPE of exactly N ids ({SMALLEST_BPE} to {VOCAB_SIZE:,}; K = "
                            f"ceil(log2 N) code bits) instead of the code-point tokenizer (default: code-point, "
                            f"V = {VOCAB_SIZE:,})")
    build.add_argument("--limit-chars", type=int, default=None, help="read at most this many characters (default: all)")
    build.add_argument("--force", action="store_true",
                       help="write into an existing non-empty --out (files tablefree did not write are never touched)")
    add_reading_options(build)
    build.set_defaults(run=tokenizer_build_command)
