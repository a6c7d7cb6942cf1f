"""The embedded default corpus: documentation text that ships with every Python interpreter.

`pydoc_data.topics` (the text behind `help()`) plus the docstrings of the standard library's
modules, read from source with `ast` (nothing is imported). Deterministic: sorted, same order on
every machine with the same Python version, so everything runs offline on a fresh install.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path


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


TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def read_local_file(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a local .txt (one per blank-line-separated paragraph), .jsonl or .parquet file, via `datasets`."""
    from datasets import load_dataset

    from .errors import TableFreeError

    builder = TEXT_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise TableFreeError(f"cannot read {path}: expected one of {', '.join(sorted(TEXT_SUFFIXES))}")
    if not path.is_file():
        raise TableFreeError(f"no such file: {path}")
    if path.stat().st_size == 0:  # datasets fails on a 0-byte file with an unrelated StopIteration
        raise TableFreeError(f"the corpus is empty: {path} has no bytes")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    dataset = load_dataset(builder, data_files=str(path), split="train", streaming=True, **kwargs)
    for row in dataset:
        if text_field not in row:
            raise TableFreeError(f"{path} has no {text_field!r} field; its fields are {', '.join(row)}")
        if row[text_field]:
            yield row[text_field]


def read_corpus(sources: list[str], limit_chars: int | None = None) -> Iterator[str]:
    """Documents from each source in turn: `embedded` or a local file path; stops after `limit_chars`."""
    total = 0
    for source in sources:
        documents = embedded_documents() if source == "embedded" else read_local_file(Path(source))
        for doc in documents:
            yield doc
            total += len(doc)
            if limit_chars is not None and total >= limit_chars:
                return
