"""`tablefree export MODEL OUT --format gguf`: the GPT-NeoX export as a GGUF file that llama.cpp runs.

The network is `export.to_gpt_neox(model)` (a table-free model's fixed code vectors become the token
embedding constant), written under llama.cpp's `gptneox` architecture; the tokenizer travels inside
the file. The GGUF layout and the tokenizer mapping are described in docs/formats.md.

The code-point tokenizer is a BPE over characters, pre-split by one regex, without byte-level
mapping. llama.cpp's BPE vocabulary ("gpt2") always works on GPT-2's byte-level alphabet, so every
token text is written in that alphabet and merges that assemble each multi-byte character from its
UTF-8 bytes are ranked before the tokenizer's own: llama.cpp then reaches whole characters before
any n-gram merge, as the tokenizer starts from them. Its pre-tokenizer "trillion" is GPT-2's regex
(ours plus English contractions) without GPT-2's space clean-up on decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TableFreeError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_NAME = "model.gguf"
CARD_NAME = "README.md"
GGUF_KIND = "gguf"  # the kind of output directory files.claim_output_dir sees
INSTALL_HINT = 'pip install "tablefree[llama]"'
# llama.cpp's GPT-2 regex without its decode-time space clean-up (see the module docstring).
LLAMA_PRE_TOKENIZER = "trillion"
GELU_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise TableFreeError(f"the GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def llama_cpp_without_repacking() -> None:
    """Every llama_cpp.Llama this process makes from now on keeps its weights as the file stores them, without
    llama.cpp's extra buffer types (the AMX and CPU repacking of quantized weights).

    On an Intel Xeon with AMX (this project's development machine, llama-cpp-python 0.3.36 compiled for it), llama.cpp
    repacks a q8_0 file's weights for AMX and its first evaluation then ends the process (SIGSEGV); without
    repacking the same file runs (small-affine's q8_0 export: 886 tokens/s on one stream, 2 threads). The tests
    and benches that run llama.cpp call this; llama-cpp-python has no argument for it, so its default model
    parameters are wrapped.
    """
    from llama_cpp import llama as high_level

    defaults = high_level.llama_cpp.llama_model_default_params
    if getattr(defaults, "without_repacking", False):
        return

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    without_repacking.without_repacking = True
    high_level.llama_cpp.llama_model_default_params = without_repacking


def _byte_level(text: str, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def code_point_vocab(tokenizer, vocab_size: int, token_type):
    """(tokens, token types, merges) of a character-level BPE tokenizer in llama.cpp's "gpt2" vocabulary form.

    `tokenizer` is a transformers fast tokenizer whose backend is a BPE without normalizer or
    byte-level pre-tokenizer (the code-point tokenizer is one); ids beyond its vocabulary up to the
    model's `vocab_size` are written as unused placeholders.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte-level alphabet

    from .tokenizer import SPLIT_PATTERN

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    pattern = (pre.get("pattern") or {}).get("Regex")
    if model.get("type") != "BPE" or spec.get("normalizer") or pre.get("type") != "Split" or pattern != SPLIT_PATTERN:
        raise TableFreeError(
            "the GGUF export supports the code-point tokenizer (a character-level BPE split by tablefree's regex, "
            f"no normalizer); this model's tokenizer is a {model.get('type')} model with pre-tokenizer "
            f"{pre.get('type')!r}{' and a normalizer' if spec.get('normalizer') else ''}: export it with --format gpt-neox"
        )
    alphabet = bytes_to_unicode()
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    texts: list[str | None] = [None] * vocab_size
    types = [token_type.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size and i not in added:
            texts[i] = _byte_level(text, alphabet)
            types[i] = token_type.UNUSED if text.startswith("<reserved_0x") else token_type.NORMAL
    for i, token in added.items():
        if i < vocab_size:
            texts[i] = token["content"]
            types[i] = token_type.CONTROL if token.get("special") else token_type.USER_DEFINED
    for i, text in enumerate(texts):
        if text is None:
            texts[i] = f"[PAD{i}]"
    if len(set(texts)) != len(texts):
        raise TableFreeError("two tokens of the tokenizer have the same text in llama.cpp's byte-level form; "
                             "the GGUF export cannot keep them apart")
    merges = _character_merges(model["vocab"], added, alphabet)
    for merge in model.get("merges") or []:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merges.append(f"{_byte_level(left, alphabet)} {_byte_level(right, alphabet)}")
    return texts, types, merges


def _character_merges(vocab: dict[str, int], added: dict, alphabet: dict[int, str]) -> list[str]:
    """Merges that join the UTF-8 bytes of each multi-byte one-character token into that character."""
    merges: dict[str, None] = {}  # ordered set: a shared prefix (first bytes of many characters) merges once
    for text, i in sorted(vocab.items(), key=lambda item: item[1]):
        if len(text) != 1 or i in added:
            continue
        units = [alphabet[b] for b in text.encode("utf-8")]
        for end in range(1, len(units)):
            merges.setdefault(f"{''.join(units[:end])} {units[end]}")
    return list(merges)


def write_gguf(model, tokenizer, path: Path, outtype: str, name: str) -> None:
    """Write `model` (a GPTNeoXForCausalLM, see export.to_gpt_neox) and its tokenizer as one GGUF file."""
    import numpy as np
    import torch

    gguf = import_gguf()
    config = model.config
    if config.hidden_act not in GELU_ACTIVATIONS:
        raise TableFreeError(f"llama.cpp's GPT-NeoX runs a GELU MLP; this model's hidden_act is {config.hidden_act!r}")
    tokens, types, merges = code_point_vocab(tokenizer, config.vocab_size, gguf.TokenType)

    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPTNEOX])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(width)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10_000.0)))
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(config.layer_norm_eps)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[outtype]
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # the tokenizer adds nothing around a text
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
        eot = tokenizer.convert_tokens_to_ids("[EOT]") if "[EOT]" in tokenizer.get_vocab() else None
        if eot is not None:
            writer.add_eot_token_id(eot)  # a chat reply ends there

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_hidden_layers)
    quantized = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    state = model.state_dict()
    for key, tensor in state.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TableFreeError(f"the GGUF export has no llama.cpp name for tensor {key}")
        tensor = tensor.detach().to(torch.float32)
        if key.endswith(("attention.query_key_value.weight", "attention.query_key_value.bias")):
            # transformers keeps q, k, v per head; llama.cpp splits the fused rows as all q | all k | all v.
            tensor = tensor.reshape(heads, 3, head_dim, -1).transpose(0, 1).reshape(tensor.shape)
        data = tensor.cpu().numpy()
        qtype = quantized if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms and biases stay f32
        try:
            data = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row not a multiple of the q8_0 block: this tensor in f16
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_card(name: str, outtype: str) -> str:
    return f"""# {name} (GGUF, {outtype})

Written by `tablefree export --format gguf`: the GPT-NeoX form of a tablefree model, with its
tokenizer, for llama.cpp (architecture `gptneox`). Serve it with llama-cpp-python's OpenAI-compatible
server and call it as any tablefree server:

```bash
pip install "llama-cpp-python[server]"
python -m llama_cpp.server --model {GGUF_NAME} --model_alias {name} --port 30000
curl -X POST "http://localhost:30000/v1/completions" -H "Content-Type: application/json" \\
  --data '{{"model": "{name}", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}}'
```
"""
