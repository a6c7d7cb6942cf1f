"""The engine's decode step for GPT-NeoX-shaped models (tablefree's own and stock GPT-NeoX), over a KV cache of slots.

transformers' forward is general: each call builds a 4-D mask, walks hooks and kwargs, and a DynamicCache grows by
concatenation, so the batch's cache is copied whenever rows join or leave. A decode step of a small model spends
more time there than in its arithmetic (docs/architecture.md, "Where a decode step's time goes"). Here one step is
the same arithmetic as GPTNeoXModel.forward for one new token per row, written as the few tensor operations it is:

* The cache is preallocated per layer as (rows, heads, capacity, head size), grown by doubling. Row i of the batch
  lives in slot i, its tokens at positions 0..n-1 (aligned left): a step writes each row's new key and value in place
  at its own position and attends over the slots' first L positions, L the longest row, masking each row's tail.
* A finished row's slot is refilled by the last row's (one copy of that row), so the live rows stay slots 0..n-1.
* Its weights are the model's own: nothing is copied, except by `lower_body` (below). The rotary embedding is the
  model's module, the layer norms its modules' weights, the activation its function, the head the engine's.

Prompts are still prefilled by the model's own forward, whose cache is copied into the rows' slots: a prefill runs
once per sequence and is bound by arithmetic, not by Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

from ..codes import CodeLift
from .precision import Int8Linear

MIN_CAPACITY = 64  # cache positions allocated at first; the capacity doubles from there up to the context length


def unsupported(model) -> str | None:
    """Why `model` cannot run this decode step (then the engine runs its own forward), or None when it can."""
    if not isinstance(model, GPTNeoXForCausalLM):
        return f"{type(model).__name__} is not GPT-NeoX-shaped"
    base = model.gpt_neox
    if type(base.rotary_emb) is not GPTNeoXRotaryEmbedding:
        return "its rotary embedding is not GPT-NeoX's"
    if model.training:
        return "it is in training mode"
    head = model.get_output_embeddings()  # called as a module, hooks and all
    for module in model.modules():
        if module is not head and (module._forward_hooks or module._forward_pre_hooks):
            return f"a hook is registered on {type(module).__name__} (the decode step would bypass it)"
    return None


class _Layer:
    """One GPTNeoXLayer's weights, read once."""

    def __init__(self, layer, lower: bool):
        attention, mlp = layer.attention, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        linear = Int8Linear if lower else (lambda module: module)
        self.qkv, self.dense = linear(attention.query_key_value), linear(attention.dense)
        self.up, self.down = linear(mlp.dense_h_to_4h), linear(mlp.dense_4h_to_h)
        self.act = mlp.act
        self.parallel = layer.use_parallel_residual
        self.head_size, self.scaling = attention.head_size, attention.scaling


class SlotDecoder:
    """Decode steps of up to `max_rows` rows over a cache of slots (see the module's docstring)."""

    def __init__(self, model, max_rows: int, max_len: int, lower_body: bool = False):
        """`lower_body`: the body's linear layers as int8 weights (Int8Linear), for a CPU; else the model's own."""
        problem = unsupported(model)
        if problem:
            raise ValueError(f"the slot decoder cannot run this model: {problem}")
        self.model = model
        base = model.gpt_neox
        self.embed, self.rotary, self.final_norm = base.embed_in, base.rotary_emb, base.final_layer_norm
        self.layers = [_Layer(layer, lower_body) for layer in base.layers]
        self.max_rows, self.max_len = max_rows, max_len
        self.dtype = self.final_norm.weight.dtype
        self.device = self.final_norm.weight.device
        config = model.config
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # live rows, in slots 0..rows-1

    # ---- the cache ----
    def _reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` positions, keeping what the live slots hold."""
        have_rows, have_len = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        if rows <= have_rows and length <= have_len:
            return
        new_rows, new_len = max(have_rows, 1), max(have_len, MIN_CAPACITY)
        while new_rows < rows:
            new_rows *= 2
        while new_len < length:
            new_len *= 2
        shape = (min(new_rows, self.max_rows), self.heads, min(new_len, self.max_len), self.head_size)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # Zeros: a masked position's value meets a zero weight, and 0 x NaN would still be NaN.
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None and self.rows:
                new[: self.rows, :, :have_len] = old[: self.rows]
            return new

        self.keys = [grown(old) for old in self.keys or [None] * len(self.layers)]
        self.values = [grown(old) for old in self.values or [None] * len(self.layers)]

    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]) -> None:
        """Appends rows whose caches are `layers` (per layer (keys, values) of shape (rows, heads, width, head size),
        each row's `lengths[i]` real positions at the right end, as a left-padded prefill leaves them)."""
        first = self.rows
        self._reserve(first + len(lengths), max(lengths) + 1)
        for (keys, values), own_keys, own_values in zip(layers, self.keys, self.values):
            width = keys.shape[2]
            for row, length in enumerate(lengths):
                slot = first + row
                own_keys[slot, :, :length] = keys[row, :, width - length :]
                own_values[slot, :, :length] = values[row, :, width - length :]
                own_keys[slot, :, length:] = 0
                own_values[slot, :, length:] = 0
        self.rows += len(lengths)

    def keep(self, keep: list[int]) -> list[int]:
        """Keeps the rows at indices `keep` (ascending), as slots 0..len(keep)-1: each freed slot among those is
        refilled by a kept row from beyond them (one copy of that row). Returns, per new slot, its row's old index."""
        count = len(keep)
        old_of = {slot: slot for slot in keep if slot < count}
        holes = [slot for slot in range(count) if slot not in old_of]
        movers = [slot for slot in keep if slot >= count]
        if holes:
            to, source = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            for tensor in self.keys + self.values:
                tensor[to] = tensor[source]
            old_of.update(zip(holes, movers))
        self.rows = count
        return [old_of[slot] for slot in range(count)]

    def clear(self) -> None:
        self.rows = 0

    # ---- a step ----
    def step(self, ids: torch.Tensor, positions: torch.Tensor, first: int = 0, head=None) -> torch.Tensor:
        """The last hidden state, (rows, 1, width), or given `head` the logits, (rows, 1, V), of one new token per row for the rows in slots
        first..first+len(ids)-1: `ids` and `positions` (where each token is written, its row's length so far) are
        1-D. Each row reads its own slot's positions 0..position and nothing else."""
        n = len(ids)
        end = int(positions.max()) + 1
        self._reserve(first + n, end)
        ids, positions = ids.to(self.device), positions.to(self.device)
        if isinstance(self.embed, CodeLift):
            x = self.embed(ids[:, None], dtype=self.dtype)
        else:
            x = self.embed(ids[:, None])
        cos, sin = self.rotary(x, position_ids=positions[:, None])  # (n, 1, rotary dims), as GPTNeoXModel calls it
        mask = (torch.arange(end, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        rows = torch.arange(first, first + n, device=self.device)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            hidden = layer.norm1(x)
            qkv = layer.qkv(hidden).view(n, 1, -1, 3 * self.head_size).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            attended = F.scaled_dot_product_attention(q, keys[first : first + n, :, :end],
                                                      values[first : first + n, :, :end], attn_mask=mask,
                                                      scale=layer.scaling)
            attended = layer.dense(attended.transpose(1, 2).reshape(n, 1, -1))
            if layer.parallel:  # the sums in GPTNeoXLayer's order, so they round alike
                x = layer.down(layer.act(layer.up(layer.norm2(x)))) + attended + x
            else:
                x = x + attended
                x = x + layer.down(layer.act(layer.up(layer.norm2(x))))
        x = self.final_norm(x)
        return x if head is None else head(x)
