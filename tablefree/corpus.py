"""The corpora documents come from: the embedded default, and local .txt/.jsonl/.parquet files.

The embedded corpus is documentation text that ships with every Python interpreter:
`pydoc_data.topics` (the text behind `help()`) plus the docstrings of the standard library's
modules, read from source with `ast` (nothing is imported). Deterministic: sorted, same order on
every machine with the same Python version, so everything runs offline on a fresh install.

Local files are read as a stream (docs/safety.md): memory grows with the longest document, never
with the file. Bad input is an error naming the file and the line, byte or row, unless an option
says to replace undecodable text (`bad_text="replace"`) or to skip malformed records
(`bad_records="skip"`); what was replaced or skipped is counted in `ReadCounts`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import TableFreeError

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BAD_TEXT = ("error", "replace")
BAD_RECORDS = ("error", "skip")
# A document longer than this reaches the tokenizer in pieces, so its encoding never holds it whole.
PIECE_CHARS = 1 << 18
_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_SPACE = re.compile(r"\S")


@dataclass(frozen=True)
class ReadOptions:
    """What to do with input that is not clean text: stop with an error (the default), or replace/skip it."""

    bad_text: str = "error"  # undecodable bytes and lone surrogates: "error", or "replace" each with U+FFFD
    bad_records: str = "error"  # malformed JSON lines and records without a string text field: "error" or "skip"

    def __post_init__(self):
        if self.bad_text not in BAD_TEXT:
            raise TableFreeError(f"bad_text {self.bad_text!r} is not one of {', '.join(BAD_TEXT)}")
        if self.bad_records not in BAD_RECORDS:
            raise TableFreeError(f"bad_records {self.bad_records!r} is not one of {', '.join(BAD_RECORDS)}")


@dataclass
class ReadCounts:
    """What reading replaced or left out (prepared data records it in its manifest)."""

    replaced_characters: int = 0  # undecodable bytes and lone surrogates written as U+FFFD
    skipped_records: int = 0  # malformed records left out
    empty_documents: int = 0  # empty or whitespace-only documents left out


def embedded_documents(max_docstring_files: int | None = None) -> Iterator[str]:
    """Yield the embedded corpus as documents: one per help topic, one per stdlib docstring."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    files = files[:max_docstring_files]
    # Parsing ~2,000 files dominates; a process pool's ordered map keeps the output identical.
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(files), os.cpu_count() or 1) if files else 0
    if workers <= 1:
        for path in files:
            yield from file_docstrings(path)
        return
    pool = ProcessPoolExecutor(workers)
    try:
        for docs in pool.map(file_docstrings, files, chunksize=32):
            yield from docs
    finally:
        pool.shutdown(cancel_futures=True)  # a reader that stops early does not wait for the rest


# Held-out text of another kind than the embedded corpus (reference docstrings and help topics), on every
# machine with Python: IDLE's change logs, history and readme, and Python's licence. The corpus never reads them.
PYTHON_NOTES = "python-notes"
PYTHON_NOTES_FILES = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt", "idlelib/README.txt",
                      "LICENSE.txt")


def python_notes_documents() -> list[str]:
    """The `python-notes` held-out text: one document per file of PYTHON_NOTES_FILES that this Python has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in PYTHON_NOTES_FILES:
        try:
            text = (stdlib / name).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if text:
            documents.append(text)
    if not documents:
        raise TableFreeError(f"this Python has none of the {PYTHON_NOTES} files ({', '.join(PYTHON_NOTES_FILES)} "
                             f"under {stdlib}); evaluate on a text file instead")
    return documents


# Held-out plain English: stories, letters, a travel diary, everyday essays, a book review, a speech and a news
# report, written for this project and shipped with it (tablefree/heldout/english_prose); no corpus contains them.
ENGLISH_PROSE = "english-prose"
# English prose to train on, also written for this project and shipped with it (tablefree/prose): short stories,
# letters and memoirs, essays on nature and science, everyday essays, reviews and reports, tales and dialogue.
# Other documents by other hands than the english-prose held-out text, on other subjects (tests check they share
# no passage). The quickstart mixes it with the embedded corpus so that its models meet English, not only Python's
# documentation.
PROSE = "prose"


def package_texts(folder: str, name: str) -> list[str]:
    """The documents of a text shipped with tablefree: one per .txt file of `folder`, in name order."""
    from importlib.resources import files

    where = files("tablefree").joinpath(*folder.split("/"))
    try:
        entries = sorted((entry for entry in where.iterdir() if entry.name.endswith(".txt")), key=lambda e: e.name)
        documents = [entry.read_text(encoding="utf-8").strip() for entry in entries]
    except OSError as exc:
        raise TableFreeError(f"cannot read the {name} text of this tablefree installation ({exc}); "
                             f"reinstall tablefree") from None
    if not documents:
        raise TableFreeError(f"this tablefree installation has no {name} files in {where}; reinstall it")
    return documents


def english_prose_documents() -> list[str]:
    """The `english-prose` held-out text: one document per .txt file of heldout/english_prose, in name order."""
    return package_texts("heldout/english_prose", ENGLISH_PROSE)


def prose_documents() -> list[str]:
    """The `prose` training corpus: one document per .txt file of tablefree/prose, in name order."""
    return package_texts("prose", PROSE)


# The corpora that ship with tablefree or Python, known by name wherever a corpus is (`--source`, `--corpus`).
BUILTIN_CORPORA = {"embedded": embedded_documents, PROSE: prose_documents}

# The held-out texts known by name (`tablefree eval --data NAME`, `compare --heldout NAME`) and their documents.
HELDOUT_TEXTS = {PYTHON_NOTES: python_notes_documents, ENGLISH_PROSE: english_prose_documents}


def file_docstrings(path: Path) -> list[str]:
    """Docstrings of at least 80 characters of one source file, in `ast.walk` order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []  # a few stdlib files are templates or other encodings; the corpus needs none of them
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                docs.append(doc)
    return docs


def read_local_file(path: Path, text_field: str = "text", options: ReadOptions = ReadOptions(),
                    counts: ReadCounts | None = None) -> Iterator[str]:
    """Documents of a local file: a .txt (one per paragraph: blank lines separate them), .jsonl/.json (one
    JSON object per line, its `text_field` the document) or .parquet (the `text_field` column)."""
    path = Path(path)
    counts = ReadCounts() if counts is None else counts
    kind = TEXT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TableFreeError(f"cannot read {path}: expected one of {', '.join(sorted(TEXT_SUFFIXES))}")
    if not path.exists():
        raise TableFreeError(f"no such file: {path}")
    if not path.is_file():
        raise TableFreeError(f"cannot read {path}: it is not a regular file")
    if path.stat().st_size == 0:
        raise TableFreeError(f"the corpus is empty: {path} has no bytes")
    if kind == "text":
        documents = _paragraphs(path, options, counts)
    elif kind == "json":
        documents = _json_lines(path, text_field, options, counts)
    else:
        documents = _parquet_column(path, text_field, options, counts)
    for text in documents:
        if has_text(text):
            yield text
        else:
            counts.empty_documents += 1


def has_text(text: str) -> bool:
    """Whether a document holds anything but whitespace (others are left out as empty)."""
    return _NON_SPACE.search(text) is not None


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes without the line ending) of each line of a file."""
    offset = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                offset, start = offset + len(raw), offset
                if raw.endswith(b"\n"):
                    raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
                yield number, start, raw
    except OSError as exc:
        raise TableFreeError(f"cannot read {path}: {exc.strerror or exc}") from None


def decode(raw: bytes, where: str, offset: int, options: ReadOptions, counts: ReadCounts) -> str:
    """UTF-8 bytes as text; an undecodable byte is an error naming its offset, or (replace) U+FFFD."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if options.bad_text == "error":
            raise TableFreeError(
                f"{where}: invalid UTF-8 at byte {offset + exc.start:,} (this is not UTF-8 text); convert it "
                f"(for example `iconv -f latin1 -t utf-8`), or pass --bad-text replace to write U+FFFD for each "
                f"undecodable byte (they are counted)"
            ) from None
    return clean_text(raw.decode("utf-8", "surrogateescape"), where, options, counts)


def clean_text(text: str, where: str, options: ReadOptions, counts: ReadCounts) -> str:
    """`text` without lone surrogates (which no tokenizer or UTF-8 file can hold): an error, or U+FFFD each."""
    found = _SURROGATE.search(text)
    if found is None:
        return text
    if options.bad_text == "error":
        raise TableFreeError(
            f"{where}: the text holds a lone surrogate (U+{ord(found.group()):04X} at character {found.start():,}), "
            f"which is not valid Unicode; fix it, or pass --bad-text replace to write U+FFFD instead (they are counted)"
        )
    text, replaced = _SURROGATE.subn("\ufffd", text)
    counts.replaced_characters += replaced
    return text


def bad_record(problem: str, options: ReadOptions, counts: ReadCounts) -> None:
    """A record that holds no document: an error, or (skip) counted and left out."""
    if options.bad_records == "error":
        raise TableFreeError(f"{problem}; fix it, or pass --bad-records skip to leave such records out (they are counted)")
    counts.skipped_records += 1


def record_text(record, text_field: str, where: str, options: ReadOptions, counts: ReadCounts) -> str | None:
    """The document of one JSON/dataset record, None when the record is skipped; null counts as empty."""
    if not isinstance(record, dict):
        bad_record(f"{where}: a JSON {_json_kind(record)}, not an object with a {text_field!r} field", options, counts)
        return None
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        bad_record(f"{where}: no {text_field!r} field (its fields: {fields}); choose one with --text-field", options, counts)
        return None
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        bad_record(f"{where}: the {text_field!r} field holds a {_json_kind(value)}, not a string", options, counts)
        return None
    return clean_text(value, where, options, counts)


def _json_kind(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def _paragraphs(path: Path, options: ReadOptions, counts: ReadCounts) -> Iterator[str]:
    """Paragraphs of a UTF-8 text file, read line by line; lines end with \\n or \\r\\n, kept as \\n."""
    lines: list[str] = []
    for number, offset, raw in _lines(path):
        if raw and not raw.isspace():  # not strip(): a copy of a 50 MB line is 50 MB more
            lines.append(decode(raw, f"{path} line {number:,}", offset, options, counts))
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _json_lines(path: Path, text_field: str, options: ReadOptions, counts: ReadCounts) -> Iterator[str]:
    """The `text_field` of each JSON object, one per line; blank lines are ignored."""
    for number, offset, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path} line {number:,}"
        line = decode(raw, where, offset, options, counts)
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser allows
            bad_record(f"{where}: not valid JSON ({exc}); each line must be one JSON object", options, counts)
            continue
        text = record_text(record, text_field, where, options, counts)
        if text is not None:
            yield text


def _parquet_column(path: Path, text_field: str, options: ReadOptions, counts: ReadCounts) -> Iterator[str]:
    """The `text_field` column of a Parquet file, a batch of rows at a time; nulls count as empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise TableFreeError(f"cannot read {path} as Parquet ({exc}); is it a complete .parquet file?") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise TableFreeError(f"{path} has no {text_field!r} column (its columns: {', '.join(schema.names)}); choose one with --text-field")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise TableFreeError(f"the {text_field!r} column of {path} holds {column_type}, not strings")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=256, columns=[text_field]):
            # As bytes, so text that is not UTF-8 is found (and named by row) here rather than deep in Arrow.
            for value in batch.column(0).cast(pa.large_binary()).to_pylist():
                row += 1
                yield "" if value is None else decode(value, f"{path} row {row:,}", 0, options, counts)
    except (pa.ArrowException, OSError) as exc:
        raise TableFreeError(f"{path} is damaged after row {row:,} ({exc}); restore or re-export it") from None


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut just before a whitespace
    character that stands between two others, where tokenizers that split words at whitespace (GPT-2's,
    the code-point tokenizer's) cut as well, so the pieces encode to the same ids as the whole."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = max(_last_cut(text, start + size // 2, end, space) for space in " \n\t")
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_cut(text: str, low: int, high: int, space: str) -> int:
    """The last position in [low, high) holding `space` between two non-whitespace characters, or -1."""
    at = text.rfind(space, low, high)
    while at > low and (text[at - 1].isspace() or text[at + 1].isspace()):
        at = text.rfind(space, low, at)
    return at if at > low else -1


def leading_text(documents: Iterable[str], limit_chars: int | None) -> Iterator[str]:
    """The first `limit_chars` characters of `documents` (all of them for None), in pieces."""
    total = 0
    for doc in documents:
        for piece in pieces(doc):
            if limit_chars is not None:
                piece = piece[: limit_chars - total]
            yield piece
            total += len(piece)
            if limit_chars is not None and total >= limit_chars:
                return


def read_corpus(sources: list[str], limit_chars: int | None = None, text_field: str = "text",
                options: ReadOptions = ReadOptions(), counts: ReadCounts | None = None) -> Iterator[str]:
    """Text from each source in turn (a BUILTIN_CORPORA name or a file), in pieces, stopping after `limit_chars`."""

    def documents():
        for source in sources:
            if source in BUILTIN_CORPORA:
                yield from BUILTIN_CORPORA[source]()
            else:
                yield from read_local_file(Path(source), text_field=text_field, options=options, counts=counts)

    return leading_text(documents(), limit_chars)


def add_reading_options(parser) -> None:
    """The options of every command that reads local text files, defined once."""
    parser.add_argument("--text-field", default="text", help="the field (.jsonl) or column (.parquet) that holds the text")
    parser.add_argument("--bad-text", choices=BAD_TEXT, default=ReadOptions.bad_text,
                        help="undecodable bytes and lone surrogates: stop with an error that names them (default), "
                             "or replace each with U+FFFD and count them")
    parser.add_argument("--bad-records", choices=BAD_RECORDS, default=ReadOptions.bad_records,
                        help="malformed JSON lines and records without a string text field: stop with an error that "
                             "names them (default), or skip and count them")
