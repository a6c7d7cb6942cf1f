"""The GGUF export in llama.cpp (llama-cpp-python) against the tablefree model and tokenizer, one run.

Tokenizer: the code-point tokenizer (n-gram slots learned from the embedded corpus, as the quickstart
does) encodes every embedded document, llama.cpp tokenises the same text from the GGUF file
(`special=True`, no BOS); differing spans are counted and classed (a word right after an apostrophe
that llama.cpp's GPT-2 pre-tokenizer splits as a contraction; a character without a slot). Network:
a fresh small-affine model, f32 logits max |difference| and q8_0 top-1 agreement on a validation
text, and one greedy stream's tokens/s in llama.cpp against transformers' `generate`.
Last line: ratio = share of embedded documents whose ids are identical.
"""

from __future__ import annotations

import argparse
import difflib
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from tablefree.corpus import embedded_documents
from tablefree.export import export_model
from tablefree.gguf import llama_cpp_without_repacking
from tablefree.hub import save_model
from tablefree.presets import build_config, build_model
from tablefree.runtime import resolve_runtime
from tablefree.tokenizer import UNK_ID, as_transformers, build_tokenizer


def classify(ours: str) -> str:
    if "<unk>" in ours:
        return "no slot (<unk> vs dropped)"
    return "apostrophe contraction" if "'" in ours else "other"


def tokenizer_agreement(tokenizer, llm, documents: list[str]) -> None:
    identical, tokens, differing, kinds = 0, 0, 0, {}
    for text in documents:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tokens += len(ours)
        if ours == theirs:
            identical += 1
            continue
        matcher = difflib.SequenceMatcher(a=ours, b=theirs, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op != "equal":
                differing += max(i2 - i1, j2 - j1)
                # one token of context on the left shows the apostrophe that the equal span kept
                kind = classify(tokenizer.decode(ours[max(i1 - 1, 0):i2]))
                kinds[kind] = kinds.get(kind, 0) + 1
    print(f"tokenizer: {identical:,} of {len(documents):,} embedded documents identical; {differing:,} of {tokens:,} "
          f"tokens differ ({differing / tokens:.4%}); differing spans: {kinds or 'none'}")
    return identical / len(documents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=None, help="embedded documents to tokenise (default: all)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    args = parser.parse_args()
    runtime = resolve_runtime("cpu", "float32", args.threads)  # llama.cpp runs here on the CPU: compare like with like
    print(runtime.describe())
    documents = list(embedded_documents())[: args.documents]
    tokenizer = as_transformers(build_tokenizer(documents), model_max_length=1 << 30)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    model = build_model(build_config("small-affine"), seed=0).eval()
    source = save_model(model, work / "small-affine", tokenizer)
    files = {t: export_model(str(source), str(work / t), "gguf", outtype=t) for t in ("f32", "q8_0")}
    threads = torch.get_num_threads()
    llama_cpp_without_repacking()  # q8_0 files crash llama.cpp where it repacks them for AMX (see the function)
    llamas = {t: llama_cpp.Llama(model_path=str(f), n_ctx=1024, n_batch=1024, logits_all=True, verbose=False, n_threads=threads)
              for t, f in files.items()}
    f32, q8 = llamas["f32"], llamas["q8_0"]

    share = tokenizer_agreement(tokenizer, f32, documents)
    context = model.config.max_position_embeddings
    ids = tokenizer.encode("\n".join(documents[-50:]))[:context]  # validation text: the corpus's last documents
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    scores = {}
    for name, llm in (("f32", f32), ("q8_0", q8)):
        llm.reset()
        llm.eval(ids)
        scores[name] = np.array(llm.scores[: len(ids)])
    print(f"network: {len(ids)} positions; f32 logits max |diff| {np.abs(scores['f32'] - ours).max():.2e}; "
          f"q8_0 top-1 agreement {(scores['q8_0'].argmax(-1) == ours.argmax(-1)).mean():.2%} "
          f"(f32 {(scores['f32'].argmax(-1) == ours.argmax(-1)).mean():.2%})")

    prompt = tokenizer.encode("Once upon a time,")
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False, pad_token_id=UNK_ID)
    transformers_rate = args.new_tokens / (time.perf_counter() - started)
    rates = {}
    for name, llm in (("f32", f32), ("q8_0", q8)):
        llm.reset()
        started, count = time.perf_counter(), 0
        for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            count += 1
            if count == args.new_tokens:
                break
        rates[name] = count / (time.perf_counter() - started)
    print(f"one greedy stream, {args.new_tokens} tokens: transformers generate {transformers_rate:.0f} tokens/s, "
          f"llama.cpp f32 {rates['f32']:.0f} ({rates['f32'] / transformers_rate:.1f}x), "
          f"q8_0 {rates['q8_0']:.0f} ({rates['q8_0'] / transformers_rate:.1f}x)")
    print("share of embedded documents tokenised identically by llama.cpp:")
    print(f"ratio {share:.4f}")


if __name__ == "__main__":
    main()
