"""Runs under vLLM's own Python (its environment, not tablefree's): loads each model directory named in the
job file with vLLM's offline engine and writes what it produced, for tests/test_vllm.py to compare.

    python vllm_offline.py JOB.json OUT.json

JOB: {"models": {name: directory}, "prompts": [text], "max_tokens": n, "tensor_parallel": {name: directory}}.
OUT, per model: the greedy token ids and text of each prompt, each prompt position's logprob and top-1 id,
and the model's parameter shapes; the `tensor_parallel` models run again on two ranks (one core each), named `tp2:NAME`.
"""

import json
import sys


def parameter_shapes(model):
    return {name: list(param.shape) for name, param in model.named_parameters()}


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], prompt_logprobs=1, logprobs=1)
    results = {}
    runs = [(name, directory, 1) for name, directory in job["models"].items()]
    runs += [(f"tp2:{name}", directory, 2) for name, directory in job.get("tensor_parallel", {}).items()]
    for name, directory, ranks in runs:
        llm = LLM(model=directory, trust_remote_code=True, dtype="float32", enforce_eager=True,
                  max_model_len=job["max_model_len"], kv_cache_memory_bytes=job["kv_cache_bytes"], seed=0,
                  tensor_parallel_size=ranks, distributed_executor_backend="mp" if ranks > 1 else None)
        outputs = llm.generate(job["prompts"], greedy, use_tqdm=False)
        results[name] = {
            "architecture": llm.llm_engine.model_config.architecture,
            "parameters": llm.apply_model(parameter_shapes)[0],  # rank 0's shard under tensor parallelism
            "prompts": [
                {
                    "prompt_ids": list(out.prompt_token_ids),
                    "token_ids": list(out.outputs[0].token_ids),
                    "text": out.outputs[0].text,
                    # position 0 has no logprob; each later one: the prompt token's logprob and the top-1 id
                    "prompt_logprobs": [
                        [position[token].logprob, next(t for t, lp in position.items() if lp.rank == 1)]
                        for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])
                    ],
                }
                for out in outputs
            ],
        }
        del llm
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    results = run(job)
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
