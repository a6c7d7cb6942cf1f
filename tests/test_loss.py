"""The lean loss (tablefree/loss.py) against the plain full-logits cross-entropy it replaces."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from tablefree.errors import TableFreeError
from tablefree.loss import summed_cross_entropy, summed_next_token_loss
from tablefree.presets import build_model


def _plain_loss(model, ids):
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def _grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_close(lean: torch.Tensor, plain: torch.Tensor, rel: float, what: str) -> None:
    """Within `rel` of the reference's largest magnitude, element by element."""
    error = (lean.float() - plain.float()).abs().max().item()
    assert error <= rel * plain.float().abs().max().item(), f"{what}: max error {error:.3g}"


def _ids(vocab: int, shape=(3, 20), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", [1, 7, 13, 60, 1000])  # 60 = all rows at once; 13 and 7 leave a short last chunk
def test_loss_and_gradients_equal_the_plain_computation(positions):
    torch.manual_seed(0)
    vocab, width = 500, 24
    head = torch.nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(3, 20, width, requires_grad=True)
    targets = _ids(vocab)

    lean = summed_cross_entropy(head, hidden, targets, max_logits=positions * vocab)
    lean.backward()
    lean_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    plain = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    plain.backward()

    assert lean.dtype == torch.float32 and lean.item() == pytest.approx(plain.item(), rel=1e-6)
    _assert_close(lean_grads[0], hidden.grad, 1e-5, "hidden")
    _assert_close(lean_grads[1], head.weight.grad, 1e-5, "head weight")


def test_the_gradient_follows_the_loss_scale_and_accumulates():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    targets = _ids(50, (2, 5))
    (summed_cross_entropy(head, hidden, targets, max_logits=3 * 50) * 0.25).backward()
    (summed_cross_entropy(head, hidden, targets, max_logits=4 * 50) * 0.5).backward()  # accumulates, as micro-batches do
    lean = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    (F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum") * 0.75).backward()
    _assert_close(lean[0], hidden.grad, 1e-5, "hidden")
    _assert_close(lean[1], head.weight.grad, 1e-5, "head weight")


# A table-free model has no input table to tie its head to; a learned one may share it.
@pytest.mark.parametrize(("variant", "tied"), [("learned", False), ("learned", True), ("affine", False), ("minimal", False)])
def test_every_parameter_gradient_of_a_real_model_equals_the_plain_loss(variant, tied):
    model = build_model(tiny_config(variant, tie_word_embeddings=tied), seed=4)
    input_weight = getattr(model.get_input_embeddings(), "weight", None)  # the code lift has none
    assert (model.get_output_embeddings().weight is input_weight) == tied
    ids = _ids(model.config.vocab_size, (2, 17))
    positions = 5  # 32 positions: six full chunks and a short one
    lean_loss, lean = _grads(model, lambda m: summed_next_token_loss(m, ids[:, :-1], ids[:, 1:], positions * m.config.vocab_size))
    plain_loss, plain = _grads(model, lambda m: _plain_loss(m, ids))
    assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert lean.keys() == plain.keys() and len(lean) == len(list(model.parameters()))
    for name in plain:
        _assert_close(lean[name], plain[name], 1e-5, name)


@pytest.mark.parametrize("variant", ["learned", "affine"])
@pytest.mark.parametrize("positions", [9, 40])  # fewer positions per chunk than the width (32), and more
def test_under_bfloat16_autocast_it_is_close_to_the_plain_bfloat16_loss(variant, positions):
    model = build_model(tiny_config(variant), seed=5)
    ids = _ids(model.config.vocab_size, (2, 33))

    def under_autocast(loss_of):
        def run(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss_of(m)
        return run

    lean_loss, lean = _grads(model, under_autocast(lambda m: summed_next_token_loss(m, ids[:, :-1], ids[:, 1:], positions * m.config.vocab_size)))
    plain_loss, plain = _grads(model, under_autocast(lambda m: _plain_loss(m, ids)))
    fp32_loss, fp32 = _grads(model, lambda m: _plain_loss(m, ids))
    assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-3)
    assert lean_loss.item() != fp32_loss.item()  # bfloat16 products ran
    for name in plain:
        _assert_close(lean[name], plain[name], 0.03, name)


def test_no_logits_of_the_batch_are_kept_for_the_backward_pass():
    model = build_model(tiny_config("affine"), seed=6)
    vocab, rows = model.config.vocab_size, 2 * 40
    ids = _ids(vocab, (2, 41))
    computed, saved = [], []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: computed.append(out[..., 0].numel()))

    def largest_saved(loss_of) -> int:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss_of(model)
        return max(saved)

    assert largest_saved(lambda m: _plain_loss(m, ids)) >= rows * vocab  # the plain loss keeps the batch's logits
    computed.clear()
    lean = largest_saved(lambda m: summed_next_token_loss(m, ids[:, :-1], ids[:, 1:], 16 * vocab))
    assert lean <= model.get_output_embeddings().weight.numel()  # the head weight's gradient, V x d, at most
    assert max(computed) == 16 and sum(computed) == rows  # the head saw 16 positions at a time


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 40, bias=False).requires_grad_(False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = _ids(40, (6,))
    summed_cross_entropy(head, hidden, targets, max_logits=4 * 40).backward()
    lean = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(head(hidden), targets, reduction="sum").backward()
    assert head.weight.grad is None
    _assert_close(lean, hidden.grad, 1e-5, "hidden")


def test_without_gradients_it_is_the_same_sum():
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden, targets = torch.randn(2, 9, 8), _ids(40, (2, 9))
    with torch.no_grad():
        lean = summed_cross_entropy(head, hidden, targets, max_logits=4 * 40)
        plain = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten(), reduction="sum")
    assert not lean.requires_grad and lean.item() == pytest.approx(plain.item(), rel=1e-6)


def test_what_it_cannot_take_is_named():
    with pytest.raises(TableFreeError, match="bias-free output head; this Linear has a bias"):
        summed_cross_entropy(torch.nn.Linear(4, 10), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TableFreeError, match=r"hidden states \(3, 4\) and targets \(2,\) do not match"):
        summed_cross_entropy(torch.nn.Linear(4, 10, bias=False), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TableFreeError, match="GPT-NeoX causal LMs .* not Linear"):
        summed_next_token_loss(torch.nn.Linear(4, 10), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
