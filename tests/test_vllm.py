"""vLLM itself serving table-free model directories natively (its Transformers backend, no GPT-NeoX export),
compared with tablefree's own engine and server.

vLLM lives in its own environment (its transformers range is not tablefree's): these tests run it from the
Python named by TABLEFREE_VLLM_PYTHON (the README's "Serving at scale" says how to make one; CI does) and
skip, saying so, when none is given. vLLM starts once per test, module-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ENGINE_VARIANTS
from openai import OpenAI
from serve_process import ServerProcess, free_port

PROMPTS = ["Once upon a time,", "def add(a, b):\n    return", "Ünïcödé, кириллица и 中文", "  spaces\n\n\nand lines", "x"]
MAX_TOKENS = 12
CONTEXT = 256
KV_CACHE_BYTES = 1 << 28  # a small fixed KV cache: vLLM's CPU build otherwise reserves most of the machine's memory


def vllm_python() -> str:
    python = os.environ.get("TABLEFREE_VLLM_PYTHON")
    if not python:
        pytest.skip("vLLM lives in its own environment: set TABLEFREE_VLLM_PYTHON to its python "
                    "(the README's 'Serving at scale' makes one) to run the vLLM tests")
    found = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"TABLEFREE_VLLM_PYTHON={python} cannot import vllm:\n{found.stderr[-2000:]}")
    return python


def vllm_env(ranks: int = 1) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    cores = sorted(os.sched_getaffinity(0))
    if 1 < ranks <= len(cores):
        # one core per tensor-parallel rank: the CPU build binds each rank's threads to a NUMA node otherwise,
        # and a machine of one node has too few for two ranks
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"
    return env


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory, code_point_tokenizer) -> dict[str, Path]:
    from tablefree.hub import save_model
    from tablefree.presets import build_config, build_model

    root = tmp_path_factory.mktemp("vllm-models")
    return {
        name: save_model(build_model(build_config(f"tiny-{variant}", **fields), seed=2).eval(), root / name,
                         code_point_tokenizer)
        for name, (variant, fields) in ENGINE_VARIANTS.items()
    }


@pytest.fixture(scope="module")
def vllm_offline(variant_dirs, tmp_path_factory) -> dict:
    """Every variant through vLLM's offline engine, in one vLLM process."""
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm-offline")
    job = {"models": {name: str(path) for name, path in variant_dirs.items()}, "prompts": PROMPTS,
           "max_tokens": MAX_TOKENS, "max_model_len": CONTEXT, "kv_cache_bytes": KV_CACHE_BYTES,
           "tensor_parallel": {"affine": str(variant_dirs["affine"])} if len(os.sched_getaffinity(0)) >= 2 else {}}
    (work / "job.json").write_text(json.dumps(job))
    script = Path(__file__).with_name("vllm_offline.py")
    run = subprocess.run([python, str(script), str(work / "job.json"), str(work / "out.json")], env=vllm_env(ranks=2),
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"vLLM failed:\n{(run.stdout + run.stderr)[-6000:]}"
    return json.loads((work / "out.json").read_text())


def reference(path: Path) -> list[dict]:
    """Per prompt: tablefree's engine (the one `tablefree serve` runs) for the greedy text, and the float32 forward
    for the prompt's logprobs."""
    import io

    from tablefree.generate import generate_text
    from tablefree.hub import load_model

    model, tokenizer = load_model(path, dtype=torch.float32)
    found = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        text = generate_text(str(path), prompt, dtype="float32", stream=io.StringIO(), max_tokens=MAX_TOKENS)
        found.append({"ids": ids, "text": text, "logprobs": logprobs[torch.arange(len(ids) - 1), ids[1:]].tolist(),
                      "top1": logprobs.argmax(-1).tolist()})
    return found


@pytest.mark.parametrize("name", ENGINE_VARIANTS)
def test_vllm_serves_every_variant_natively_equal_to_tablefree(name, variant_dirs, vllm_offline):
    from tablefree.presets import build_config

    result = vllm_offline[name]
    variant, fields = ENGINE_VARIANTS[name]
    config = build_config(f"tiny-{variant}", **fields)
    vocab_tables = [n for n, shape in result["parameters"].items() if shape[0] == config.vocab_size]
    if variant == "learned":
        assert result["architecture"] == "GPTNeoXForCausalLM"  # vLLM's own GPT-NeoX
    else:
        # the Transformers backend on the directory's own source, and no V x d table but the output head
        assert result["architecture"] == "TransformersForCausalLM"
        assert vocab_tables == ["lm_head.weight"]
    for prompt, got, want in zip(PROMPTS, result["prompts"], reference(variant_dirs[name])):
        assert got["prompt_ids"] == want["ids"]
        assert got["text"] == want["text"], prompt
        assert [top for _, top in got["prompt_logprobs"]] == want["top1"], prompt
        diffs = [abs(a - b) for (a, _), b in zip(got["prompt_logprobs"], want["logprobs"])]
        assert max(diffs, default=0.0) < 1e-5, (prompt, max(diffs))


def test_vllm_tensor_parallel_over_two_ranks_equals_one_rank(vllm_offline):
    """The multi-GPU route, on two CPU ranks: the table-free directory sharded by its tensor-parallel plan."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallelism over two ranks needs two cores")
    one, two = vllm_offline["affine"], vllm_offline["tp2:affine"]
    assert two["parameters"]["lm_head.weight"] == [32_768, 64]  # rank 0 holds half the output head
    assert [n for n, shape in two["parameters"].items() if shape[0] in (32_768, 65_536)] == ["lm_head.weight"]
    for a, b in zip(one["prompts"], two["prompts"]):
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
        assert max((abs(x - y) for (x, _), (y, _) in zip(a["prompt_logprobs"], b["prompt_logprobs"])), default=0) < 1e-5


class VllmServer(ServerProcess):
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on a free loopback port."""

    def __init__(self, python: str, model: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--trust-remote-code",
             "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", str(CONTEXT),
             "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--seed", "0"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**vllm_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        )
        try:
            self.wait_ready(timeout=600)  # vLLM starts in 40-170 s on two shared cores
        except RuntimeError:
            self.stop()
            raise


@pytest.fixture(scope="module")
def both_servers(variant_dirs, tmp_path_factory):
    python = vllm_python()
    model = variant_dirs["affine"]
    logs = tmp_path_factory.mktemp("vllm-server")
    vllm = VllmServer(python, model, logs / "vllm.log")
    ours = ServerProcess(model, logs / "tablefree.log", "--dtype", "float32")
    yield {name: OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
           for name, server in (("vllm", vllm), ("tablefree", ours))}, str(model)
    vllm.stop()
    ours.stop()


def test_vllm_server_and_tablefree_serve_give_the_same_greedy_text(both_servers):
    clients, model = both_servers
    for prompt in PROMPTS:
        texts = {name: client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                 .choices[0].text for name, client in clients.items()}
        assert texts["vllm"] == texts["tablefree"], prompt
    messages = [{"role": "user", "content": "What is a list?"}]
    replies = {name: client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0).choices[0].message.content
               for name, client in clients.items()}
    assert replies["vllm"] == replies["tablefree"]


def test_vllm_server_and_tablefree_serve_give_the_same_prompt_logprobs(both_servers):
    clients, model = both_servers
    for prompt in PROMPTS[:3]:
        got = {name: client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                               logprobs=5).choices[0].logprobs for name, client in clients.items()}
        assert got["vllm"].tokens == got["tablefree"].tokens
        for ours, theirs in zip(got["tablefree"].top_logprobs[1:], got["vllm"].top_logprobs[1:]):
            assert list(ours) == list(theirs)  # the same tokens in the same order
            assert max(abs(ours[t] - theirs[t]) for t in ours) < 1e-5
        pairs = zip(got["tablefree"].token_logprobs[1:], got["vllm"].token_logprobs[1:])
        assert max(abs(a - b) for a, b in pairs) < 1e-5


@pytest.mark.parametrize("stream", [False, True])
def test_sampled_token_is_in_top_logprobs_on_both_servers(both_servers, stream):
    """OpenAI's semantics, which vLLM follows: the sampled token is among `top_logprobs` even outside the top k."""
    clients, model = both_servers
    for name, client in clients.items():
        reply = client.completions.create(model=model, prompt="Once", max_tokens=24, temperature=1.5, seed=3,
                                          logprobs=1, stream=stream)
        chunks = reply if stream else [reply]
        tokens, tops = [], []
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens
                tops += chunk.choices[0].logprobs.top_logprobs
        assert len(tokens) == 24, name
        assert all(token in top for token, top in zip(tokens, tops)), name
        assert any(len(top) == 2 for top in tops), name  # at this temperature some draws fall outside the top 1
