"""The GGUF export run by llama.cpp itself (llama-cpp-python): logits, greedy text, q8_0, tokenizer, server."""

import os
import subprocess
import sys
import time

import llama_cpp  # the test extra installs tablefree[llama]
import numpy as np
import pytest
import torch
from conftest import tiny_config

from tablefree.errors import TableFreeError
from tablefree.export import export_model
from tablefree.gguf import llama_cpp_without_repacking
from tablefree.hub import save_model
from tablefree.presets import build_model
from tablefree.tokenizer import UNK_ID, unknown_characters

llama_cpp_without_repacking()  # q8_0 files crash llama.cpp where it repacks them for AMX (see the function)

PROMPTS = [
    "Question: What is the capital of UK?\nAnswer:",
    "def f(x):\n    return x * 2  # doubled\n",
    "Ça va? Привет, мир! 你好，世界。",
]
# The tokenizer agreement sample: one text per kind; llama.cpp must give our ids on each.
SAMPLE = {
    "ascii prose": "The quick brown fox jumps over the lazy dog. It was 3.14 degrees, wasn't it? Yes -- 100%!",
    "code": "for i in range(10):\n\tif x[i] != y[i]:\n        print(f\"{i}: {x[i]!r}\")  # mismatch\n",
    "latin accents": "Crème brûlée, façade, naïve coöperation; Ærøskøbing; São Paulo; Straße; Łódź.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "cjk": "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "spaces and newlines": "a  b   c\n\n\nd \t e\r\n  \n    indented\n\n",
    "special tokens": "[USER]hello[EOT][ASSISTANT]hi</s><s>[INST] x [/INST]<special_token_42>",
    "punctuation": "(\"quoted\"), [brackets]; {braces}: <angles> -- em—dash… «guillemets» ‘curly’",
    "digits": "2024-01-02T03:04:05Z 1,234,567.89 ٣٤٥ ⅫⅦ ½",
}
# Characters without a slot: our tokenizer gives <unk>, llama.cpp has no unknown token for BPE and drops them.
NO_SLOT_SAMPLE = "emoji \U0001F600 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, private \ue123 use"


def gguf_of(model, tokenizer, tmp_path, outtype="f32", name="model"):
    source = save_model(model, tmp_path / name, tokenizer)
    return export_model(str(source), str(tmp_path / f"{name}-{outtype}"), "gguf", outtype=outtype)


def load_llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           n_threads=2, seed=0, **kwargs)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def affine_gguf(saved_tiny_model, tmp_path_factory):
    path, model = saved_tiny_model
    out = export_model(str(path), str(tmp_path_factory.mktemp("gguf") / "affine"), "gguf")
    return out, model


@pytest.fixture(scope="module")
def affine_llama(affine_gguf):
    return load_llama(affine_gguf[0])


def test_f32_logits_equal_the_table_free_model(affine_llama, affine_gguf, code_point_tokenizer):
    _, model = affine_gguf
    for prompt in PROMPTS:
        ids = code_point_tokenizer.encode(prompt)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].numpy()
        theirs = llama_logits(affine_llama, ids)
        assert np.abs(theirs - ours).max() <= 1e-3, prompt


def test_32_greedy_tokens_are_identical(affine_llama, affine_gguf, code_point_tokenizer):
    _, model = affine_gguf
    ids = code_point_tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
    affine_llama.reset()
    theirs = []
    for token in affine_llama.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours


def test_learned_variant_exports_with_the_same_logits(tmp_path, code_point_tokenizer):
    model = build_model(tiny_config("learned"), seed=2).eval()
    llm = load_llama(gguf_of(model, code_point_tokenizer, tmp_path, name="learned"))
    ids = code_point_tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 1e-3


@pytest.mark.parametrize("variant, overrides", [("minimal", {"code_layout": "interleave"}),
                                                ("hashed", {"code_bits": 24, "code_values": "bipolar", "code_scale": 0.5})])
def test_other_codes_export_with_the_same_logits(variant, overrides, tmp_path, code_point_tokenizer):
    model = build_model(tiny_config(variant, **overrides), seed=4).eval()
    llm = load_llama(gguf_of(model, code_point_tokenizer, tmp_path, name=variant))
    ids = code_point_tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 1e-3


def test_q8_0_through_the_cli_agrees_on_the_top_token(saved_tiny_model, affine_gguf, tmp_path, code_point_tokenizer):
    path, model = saved_tiny_model
    result = subprocess.run([sys.executable, "-m", "tablefree.cli", "export", str(path), str(tmp_path / "q8"),
                             "--format", "gguf", "--outtype", "q8_0"], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "q8" / "model.gguf"
    assert f"exported -> {out}" in result.stdout
    assert out.stat().st_size < 0.4 * affine_gguf[0].stat().st_size
    llm = load_llama(out)
    text = " ".join(SAMPLE.values())
    ids = code_point_tokenizer.encode(text)[:256]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    agree = (llama_logits(llm, ids).argmax(-1) == ours).mean()
    assert agree >= 0.95


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_half_precision_files_load_and_stay_close(outtype, saved_tiny_model, tmp_path, code_point_tokenizer):
    path, model = saved_tiny_model
    llm = load_llama(export_model(str(path), str(tmp_path / outtype), "gguf", outtype=outtype))
    ids = code_point_tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llm, ids) - ours).max() <= 0.05


def test_llama_cpp_tokenises_as_we_do(affine_llama, code_point_tokenizer):
    for kind, text in SAMPLE.items():
        ours = code_point_tokenizer.encode(text)
        theirs = affine_llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == ours, kind
        assert affine_llama.detokenize(theirs, special=True).decode("utf-8") == code_point_tokenizer.decode(ours), kind


def test_characters_without_a_slot_are_dropped_by_llama_cpp(affine_llama, code_point_tokenizer):
    """The one documented difference (README): <unk> in our ids, nothing in llama.cpp's."""
    ours = code_point_tokenizer.encode(NO_SLOT_SAMPLE)
    theirs = affine_llama.tokenize(NO_SLOT_SAMPLE.encode("utf-8"), add_bos=False, special=True)
    assert ours.count(UNK_ID) == sum(unknown_characters(NO_SLOT_SAMPLE).values())
    assert theirs == [i for i in ours if i != UNK_ID]


def test_gguf_metadata_says_sequential_residual_and_full_rotary(affine_llama):
    meta = affine_llama.metadata
    assert meta["general.architecture"] == "gptneox"
    assert meta["gptneox.use_parallel_residual"] == "false"
    assert meta["gptneox.rope.dimension_count"] == str(32 // 2)  # the whole head (width 32, 2 heads)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.add_bos_token"] == "false"
    assert meta["tokenizer.ggml.eos_token_id"] == "57346"


def test_export_refuses_bad_outtype_and_keeps_output_rules(saved_tiny_model, tmp_path):
    path, _ = saved_tiny_model
    with pytest.raises(TableFreeError, match="unknown --outtype 'q4_0'; choose one of f32, f16, bf16, q8_0"):
        export_model(str(path), str(tmp_path / "a"), "gguf", outtype="q4_0")
    with pytest.raises(TableFreeError, match="--outtype applies to --format gguf only"):
        export_model(str(path), str(tmp_path / "b"), "gpt-neox", outtype="f16")
    with pytest.raises(TableFreeError, match="OUT is a directory that receives model.gguf"):
        export_model(str(path), str(tmp_path / "model.gguf"), "gguf")
    with pytest.raises(TableFreeError, match="inside the input"):
        export_model(str(path), str(path / "gguf"), "gguf", force=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.gguf").write_bytes(b"not ours")
    with pytest.raises(TableFreeError, match="not empty"):
        export_model(str(path), str(foreign), "gguf")
    with pytest.raises(TableFreeError, match="was not written by tablefree"):
        export_model(str(path), str(foreign), "gguf", force=True)
    assert (foreign / "model.gguf").read_bytes() == b"not ours"
    out = export_model(str(path), str(tmp_path / "ours"), "gguf", outtype="q8_0")
    first = out.stat().st_size
    assert export_model(str(path), str(tmp_path / "ours"), "gguf", force=True) == out  # our own file: replaced
    assert out.stat().st_size > first
    assert sorted(p.name for p in out.parent.iterdir()) == [".tablefree-output.json", "README.md", "model.gguf"]


def test_llama_cpp_server_answers_the_model_card_curl(affine_gguf, tmp_path, code_point_tokenizer):
    import httpx
    from serve_process import free_port

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(affine_gguf[0]), "--port", str(port),
               "--model_alias", "affine", "--n_ctx", "1024", "--n_threads", "2"]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not come up"
            time.sleep(0.3)
        body = {"model": "affine", "prompt": "Once upon a time,", "max_tokens": 16, "temperature": 0.5}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
        prompt = code_point_tokenizer.encode(body["prompt"])
        assert answer["usage"]["prompt_tokens"] == len(prompt)
        greedy = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 0}, timeout=60).json()
        with torch.no_grad():
            ours = affine_gguf[1].generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert greedy["choices"][0]["text"] == code_point_tokenizer.decode(ours[0, len(prompt):])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_without_the_gguf_package_the_error_says_what_to_install(saved_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets where the package is absent
    with pytest.raises(TableFreeError, match=r'the GGUF export needs the gguf package: pip install "tablefree\[llama\]"'):
        export_model(str(saved_tiny_model[0]), str(tmp_path / "out"), "gguf")
    assert not (tmp_path / "out").exists()
