"""Throughput of the code-point tokenizer on the embedded corpus, against a byte-level BPE of 65,536
tokens trained with `tokenizers` on the same corpus (the usual alternative), measured in one run.

Last line: code-point MB/s divided by byte-level BPE MB/s.
"""

from __future__ import annotations

import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tablefree.corpus import embedded_documents
from tablefree.tokenizer import build_tokenizer


def throughput(tokenizer: Tokenizer, docs: list[str], megabytes: float, repeats: int = 3) -> tuple[float, int]:
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        encodings = tokenizer.encode_batch(docs)
        best = min(best, time.perf_counter() - start)
        tokens = sum(len(e.ids) for e in encodings)
    return megabytes / best, tokens


def main() -> None:
    docs = list(embedded_documents())
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    start = time.perf_counter()
    code_point = build_tokenizer(docs)
    build_seconds = time.perf_counter() - start
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=65_536, show_progress=False))
    rows = [("code-point (V 65,536)", *throughput(code_point, docs, megabytes)), ("byte-level BPE", *throughput(bpe, docs, megabytes))]
    print(f"embedded corpus: {len(docs):,} documents, {megabytes:.2f} MB; code-point build {build_seconds:.1f} s")
    print(f"{'tokenizer':24s} {'MB/s':>8s} {'tokens':>10s} {'bytes/token':>12s}")
    for name, rate, tokens in rows:
        print(f"{name:24s} {rate:8.2f} {tokens:10,d} {megabytes * 1e6 / tokens:12.2f}")
    print(f"ratio {rows[0][1] / rows[1][1]:.2f}")


if __name__ == "__main__":
    main()
