import contextlib

import pytest
import torch
from conftest import ENGINE_VARIANTS, tiny_config
from transformers import GPTNeoXForCausalLM

from tablefree.codes import CodeLift
from tablefree.errors import TableFreeError
from tablefree.modeling_tablefree import TableFreeForCausalLM
from tablefree.presets import build_config, build_model


@pytest.mark.parametrize(
    "preset, total, input_params",
    [("paper-learned", 537_298_944, 67_108_864), ("paper-minimal", 470_190_080, 0), ("paper-affine", 470_190_080, 0)],
)
def test_paper_presets_have_the_papers_exact_parameter_counts(preset, total, input_params):
    config = build_config(preset)
    with torch.device("meta"):
        model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == total
    embed = model.get_input_embeddings()
    assert sum(p.numel() for p in embed.parameters()) == input_params
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (32, 1024, 32)
    assert config.rope_parameters["partial_rotary_factor"] == 1.0 and not config.use_parallel_residual
    assert model.lm_head.bias is None and not config.tie_word_embeddings


def test_learned_variant_is_stock_gpt_neox_and_table_free_inherits_it():
    assert type(build_model(tiny_config("learned"))) is GPTNeoXForCausalLM
    model = build_model(tiny_config("affine"))
    assert isinstance(model, GPTNeoXForCausalLM) and isinstance(model, TableFreeForCausalLM)
    assert isinstance(model.get_input_embeddings(), CodeLift)
    assert [layer.attention.layer_idx for layer in model.gpt_neox.layers] == [0, 1]
    assert model._supports_attention_backend


def test_initialisation_depends_on_the_model_seed_alone():
    torch.manual_seed(123)
    a = build_model(tiny_config("affine"), seed=4)
    torch.manual_seed(999)
    b = build_model(tiny_config("affine"), seed=4)
    c = build_model(tiny_config("affine"), seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("variant", ["minimal", "affine", "hashed", "gray"])
def test_kv_cache_generation_equals_full_recomputation(variant):
    model = build_model(tiny_config(variant), seed=0).eval()
    prompt = torch.randint(0, 65_536, (2, 7))
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    recomputed = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        full = model(cached).logits
        step = model(cached[:, :-1], use_cache=True)
        last = model(cached[:, -1:], cache=step.cache).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=0, atol=1e-5)


def test_left_padding_with_attention_mask_matches_unpadded():
    model = build_model(tiny_config("affine"), seed=0).eval()
    short, long = torch.randint(0, 65_536, (1, 4)), torch.randint(0, 65_536, (1, 9))
    batch = torch.cat([torch.cat([torch.full((1, 5), 57344), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 4)], 1), torch.ones(1, 9)]).long()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    torch.testing.assert_close(padded[0, 5:], alone[0], rtol=0, atol=1e-5)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=57344)
    alone_out = model.generate(short, max_new_tokens=4, do_sample=False, pad_token_id=57344)
    assert torch.equal(out[0, -4:], alone_out[0, -4:])


def test_inputs_embeds_equal_ids_through_the_lift_and_labels_give_the_loss():
    model = build_model(tiny_config("affine"), seed=0).eval()
    ids = torch.randint(0, 65_536, (2, 6))
    with torch.no_grad():
        by_ids = model(ids, labels=ids)
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids))
    torch.testing.assert_close(by_ids.logits, by_embeds.logits, rtol=0, atol=0)
    manual = torch.nn.functional.cross_entropy(by_ids.logits[:, :-1].reshape(-1, 65_536), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(by_ids.loss, manual)


def test_eager_and_sdpa_attention_agree_and_bf16_follows_the_model_dtype():
    config = tiny_config("affine")
    ids = torch.randint(0, 65_536, (2, 10))
    logits = {}
    for impl in ("eager", "sdpa"):
        config._attn_implementation = impl
        with torch.no_grad():
            logits[impl] = build_model(config, seed=0).eval()(ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)
    bf16 = build_model(config, seed=0).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert bf16(ids).logits.dtype == torch.bfloat16


def test_gradients_reach_every_parameter_with_gradient_checkpointing():
    model = build_model(tiny_config("affine"), seed=0).train()
    model.activation_checkpointing_enable()
    ids = torch.randint(0, 65_536, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_model_settings_are_clear_errors():
    with pytest.raises(TableFreeError, match="unknown preset 'paper-afine' \\(did you mean paper-affine"):
        build_config("paper-afine")
    with pytest.raises(TableFreeError, match="unknown model field 'hiden_size'.*did you mean hidden_size"):
        build_config("tiny-affine", hiden_size=64)
    with pytest.raises(TableFreeError, match="too small for vocab_size 65536"):
        build_config("tiny-hashed", code_bits=12)
    with pytest.raises(TableFreeError, match="interleave' needs hidden_size divisible"):
        build_config("tiny-affine", code_layout="interleave", hidden_size=72, num_attention_heads=2)
    with pytest.raises(TableFreeError, match="unknown code family 'ternary'; choose one of minimal, affine, hashed"):
        build_config("tiny-affine", code_family="ternary")
    with pytest.raises(TableFreeError, match="singular"):
        build_config("tiny-affine", affine_rows=[1] * 16, affine_offset=0)


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters made in this block land on the meta device, buffers stay real: how SGLang builds a model."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def flattened_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                        seq_lens, layers_seen, **kwargs):
    """An engine's attention over sequences packed into one row: causal within each, told apart by `seq_lens`
    (passed through the model's keyword arguments, as SGLang passes its batch), the mask ignored."""
    layers_seen.append(module.layer_idx)
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        for q, k, v in zip(*(x.split(seq_lens, dim=2) for x in (query, key, value)))
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("name", ENGINE_VARIANTS)
def test_sglang_transformers_backend_convention_equals_the_plain_forward(name, tmp_path, code_point_tokenizer):
    """SGLang's Transformers fallback: the base model built from the saved directory's own source with
    parameters on meta, its attention a registered function given the engine's keyword arguments, the input
    embedding replaced by a table of the engine's, sequences flattened into one row with their position_ids,
    no cache. The code lift must survive the replacement and the result equal the plain forward."""
    from safetensors.torch import load_file
    from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM

    from tablefree.hub import save_model

    variant, fields = ENGINE_VARIANTS[name]
    path = save_model(build_model(tiny_config(variant, **fields), seed=3).eval(), tmp_path / name, code_point_tokenizer)
    AttentionInterface.register("engine_flattened", flattened_attention)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    config._attn_implementation = "engine_flattened"
    with parameters_on_meta():
        base = AutoModel.from_config(config, trust_remote_code=True)
    assert base._supports_attention_backend
    replacement = torch.nn.Embedding(config.vocab_size, config.hidden_size)
    base.set_input_embeddings(replacement)
    for module in base.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[key] = torch.nn.Parameter(torch.empty_like(param, device="cpu"))
    weights = load_file(path / "model.safetensors")
    state = {k.removeprefix("gpt_neox."): v for k, v in weights.items() if k.startswith("gpt_neox.")}
    (head,) = [v for k, v in weights.items() if not k.startswith("gpt_neox.")]  # lm_head, or GPT-NeoX's embed_out
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and not missing
    base.eval()

    sequences = [torch.randint(0, config.vocab_size, (n,)) for n in (5, 1, 9, 3)]
    seq_lens = [len(s) for s in sequences]
    layers_seen: list[int] = []
    with torch.no_grad():
        hidden = base(
            input_ids=torch.cat(sequences)[None],
            position_ids=torch.cat([torch.arange(n) for n in seq_lens])[None],
            use_cache=False,
            return_dict=False,
            seq_lens=seq_lens,
            layers_seen=layers_seen,
        )[0][0]
        flattened = (hidden @ head.T).split(seq_lens)
        plain = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        for sequence, logits in zip(sequences, flattened):
            torch.testing.assert_close(logits, plain(sequence[None]).logits[0], rtol=0, atol=1e-5)
    assert sorted(set(layers_seen)) == list(range(config.num_hidden_layers))
    if variant != "learned":
        assert base.get_input_embeddings() is not replacement and not list(base.get_input_embeddings().parameters())
