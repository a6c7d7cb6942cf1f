"""Data preparation throughput: `tablefree data prepare` against a plain one-document-at-a-time encode loop.

Both read the same local .jsonl corpus (the interpreter's help topics and stdlib docstrings, repeated
to `--copies`) through `datasets` and use the same code-point tokenizer; the reference loop neither
writes shards nor splits. Prints a table and, on the last line, prepare's tokens/s over the loop's.

    python bench/prepare.py [--copies 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=3, help="how many times the embedded corpus is repeated")
    args = parser.parse_args()

    import torch

    from tablefree.corpus import embedded_documents, read_local_file
    from tablefree.data import PrepareSettings, Source, prepare
    from tablefree.tokenizer import as_transformers, build_tokenizer

    documents = list(embedded_documents())
    tokenizer = as_transformers(build_tokenizer(documents[:2000]))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w") as handle:
            for copy in range(args.copies):
                for doc in documents:
                    handle.write(json.dumps({"text": doc}) + "\n")
        chars = corpus.stat().st_size

        began = time.perf_counter()
        backend, loop_tokens = tokenizer.backend_tokenizer, 0
        for doc in read_local_file(corpus):
            loop_tokens += len(backend.encode(doc, add_special_tokens=False).ids) + 1
        loop_seconds = time.perf_counter() - began

        began = time.perf_counter()
        manifest = prepare(PrepareSettings(sources=[Source(str(corpus))], val_fraction=0.01, shard_tokens=1 << 20),
                           Path(tmp) / "data", tokenizer, progress=False)
        prepare_seconds = time.perf_counter() - began
    tokens = manifest["train_tokens"] + manifest["val_tokens"]
    assert tokens == loop_tokens, (tokens, loop_tokens)  # same corpus, same ids: only the speed may differ
    print(f"corpus: {args.copies} x embedded = {len(documents) * args.copies:,} documents, {chars / 2**20:.1f} MiB of JSONL, "
          f"{tokens:,} tokens; {torch.get_num_threads()} cores\n")
    print(f"| {'run':<48} | {'seconds':>8} | {'tokens/s':>10} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 12}|")
    print(f"| {'encode loop (one document at a time)':<48} | {loop_seconds:>8.2f} | {loop_tokens / loop_seconds:>10,.0f} |")
    print(f"| {'tablefree data prepare (batched, shards, split)':<48} | {prepare_seconds:>8.2f} | {tokens / prepare_seconds:>10,.0f} |")
    print(f"\nratio {loop_seconds / prepare_seconds:.2f}")


if __name__ == "__main__":
    main()
