"""The engine's decode step for GPT-NeoX-shaped models (tablefree's own and stock GPT-NeoX), over a KV cache of slots.

transformers' forward is general: each call builds a 4-D mask, walks hooks and kwargs, and a DynamicCache grows by
concatenation, so the batch's cache is copied whenever rows join or leave. A decode step of a small model spends
more time there than in its arithmetic (docs/architecture.md, "Where a decode step's time goes"). Here one step is
the same arithmetic as GPTNeoXModel.forward for one new token per row, written as the few tensor operations it is:

* The cache is preallocated per layer as (rows, capacity, heads, head size), grown by doubling. Row i of the batch
  lives in slot i, its tokens at positions 0..n-1 (aligned left): a step writes each row's new key and value in place
  at its own position and attends over the slots' first L positions, L the longest row, masking each row's tail.
* A finished row's slot is refilled by the last row's (one copy of that row), so the live rows stay slots 0..n-1.
* Its weights are the model's own: nothing is copied, except by `lower_body` (below) and, for bfloat16, into
  oneDNN's layout (`_linear`). The rotary embedding is the model's module, the layer norms its modules' weights, the
  activation its function, the head the engine's.

Prompts are still prefilled by the model's own forward, whose cache is copied into the rows' slots: a prefill runs
once per sequence and is bound by arithmetic, not by Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

from ..codes import CodeLift
from .native import NativeBody, native_problem
from .precision import Int8Linear, PackedLinear, lower_activation

MIN_CAPACITY = 64  # cache positions allocated at first; the capacity doubles from there up to the context length
MAX_CODE_VALUES = 1 << 24  # code values (V x K) the decoder keeps at most, 64 MiB in float32


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


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(t) * sin == cat(t2, t1) * _signed(sin), exactly (a sign)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _norm(module: torch.nn.LayerNorm):
    """The layer norm's function on its own weights: what the module computes, without a module call per use."""
    shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
    return lambda x: F.layer_norm(x, shape, weight, bias, eps)


def _linear(module: torch.nn.Linear):
    """The layer's product: for bfloat16, from oneDNN's prepacked copy of its weight (`PackedLinear`: the same bits as
    `F.linear`, which repacks at every call; 20-23 us against 33-41 a call at 1 to 32 rows); for float32 `F.linear`
    itself, faster at these sizes (9-20 us at 1 to 8 rows against 21-28 prepacked) and the model's own rounding."""
    packed = PackedLinear.of(module) if module.weight.dtype == torch.bfloat16 else None
    if packed is not None:
        return packed
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


class _Layer:
    """One GPTNeoXLayer's weights, read once."""

    def __init__(self, layer, lower: bool):
        attention, mlp = layer.attention, layer.mlp
        self.norm1, self.norm2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        linear = Int8Linear if lower else _linear
        self.qkv, self.dense = linear(attention.query_key_value), linear(attention.dense)
        self.up, self.down = linear(mlp.dense_h_to_4h), linear(mlp.dense_4h_to_h)
        # transformers' activation modules keep their function as `act` (GELUActivation: F.gelu): call it bare.
        self.act = getattr(mlp.act, "act", None) if callable(getattr(mlp.act, "act", None)) else mlp.act
        if lower:
            self.act = lower_activation(self.act)
        self.parallel = layer.use_parallel_residual
        self.scaling = attention.scaling


class SlotDecoder:
    """Decode steps of up to `max_rows` rows over a cache of slots (see the module's docstring)."""

    def __init__(self, model, max_rows: int, max_len: int, lower_body: bool = False):
        """`lower_body`: the body's linear layers as int8 weights, for a CPU, run by the native body (NativeBody) where
        it builds and takes the model, else by torch's kernels (Int8Linear); else the model's own."""
        problem = unsupported(model)
        if problem:
            raise ValueError(f"the slot decoder cannot run this model: {problem}")
        base = model.gpt_neox
        self.embed, self.rotary, self.final_norm = base.embed_in, base.rotary_emb, base.final_layer_norm
        self.max_rows, self.max_len = max_rows, max_len
        self.dtype = self.final_norm.weight.dtype
        self.device = self.final_norm.weight.device
        config = model.config
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.heads
        self._table = None
        if self.rotary.rope_type == "default":
            with torch.no_grad():
                probe = torch.zeros(1, 1, dtype=self.dtype, device=self.device)
                cos, sin = self.rotary(probe, position_ids=torch.arange(max_len, device=self.device)[None])
            self._table = (cos[0].contiguous(), _signed(sin[0]).contiguous())
        # Why int8 body steps run torch's kernels rather than the native body (None: they run natively, or the body
        # is not int8).
        self.native_problem = native_problem(model) if lower_body else None
        self._native = NativeBody(model, *self._table) if lower_body and self.native_problem is None else None
        # The torch layers, for every step that is not native (the native body keeps its own int8 copies).
        self.layers = [_Layer(layer, lower_body and self._native is None) for layer in base.layers]
        # The code's K values of every id, computed once (V x K, 4 MiB for V = 65,536 and K = 16 in float32): a step
        # then looks its ids up instead of running the code's integer operations. A cache of a fixed function, not a
        # parameter; skipped when it would be large (wide hashed codes of a large vocabulary).
        self._code_values = None
        if isinstance(self.embed, CodeLift) and self.embed.num_embeddings * self.embed.code.bits <= MAX_CODE_VALUES:
            with torch.no_grad():
                every = torch.arange(self.embed.num_embeddings, device=self.device)
                self._code_values = self.embed.code_values(self.embed.code.encode(every), self.dtype)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # live rows, in slots 0..rows-1

    # ---- the cache ----
    def _reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` positions, keeping what the live slots hold."""
        have_rows, have_len = (self.keys[0].shape[0], self.keys[0].shape[1]) if self.keys else (0, 0)
        if rows <= have_rows and length <= have_len:
            return
        new_rows, new_len = max(have_rows, 1), max(have_len, MIN_CAPACITY)
        while new_rows < rows:
            new_rows *= 2
        while new_len < length:
            new_len *= 2
        shape = (min(new_rows, self.max_rows), min(new_len, self.max_len), self.heads, self.head_size)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # Zeros: a masked position's value meets a zero weight, and 0 x NaN would still be NaN.
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None and self.rows:
                new[: self.rows, :have_len] = old[: self.rows]
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
                own_keys[slot, :length] = keys[row, :, width - length :].transpose(0, 1)
                own_values[slot, :length] = values[row, :, width - length :].transpose(0, 1)
                own_keys[slot, length:] = 0
                own_values[slot, length:] = 0
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
    def step(self, ids: torch.Tensor, positions: torch.Tensor, first: int = 0, head=None,
             slots: list[int] | None = None) -> torch.Tensor:
        """The last hidden state, (rows, 1, width), or given `head` the logits, (rows, 1, V), of one new token per row
        for the rows in slots first..first+len(ids)-1: `ids` and `positions` (where each token is written, its row's
        length so far) are 1-D. Each row reads its own slot's positions 0..position and nothing else.

        `slots`, in place of `first`: each row's slot, where several rows may share one (the slots, in their order of
        first appearance, consecutive). Rows of one slot at positions p, p+1, ... are a sequence's next tokens
        checked in one step (the engine's drafts): each writes its key and value before any row attends, and reads
        its slot up to its own position, so it gets what a step of its own would give it after the rows before it.
        Attention then takes each slot's rows as its queries, against a view of the slot (no copy of the cache).

        The same operations as GPTNeoXModel's forward for one token, in the same order, so they round alike; only the
        rows are kept 2-D and the query and key are rotated together."""
        n, heads, size = len(ids), self.heads, self.head_size
        # The rows' positions as Python ints, read once: a step of one row costs a few hundred microseconds, and each
        # small tensor operation about 5-20 us of it (the head's product has just evicted the caches).
        at = positions.tolist()
        shortest, longest = min(at), max(at)
        end = longest + 1
        slots = list(range(first, first + n)) if slots is None else slots
        if len(slots) != n:
            raise ValueError(f"{n} rows and {len(slots)} slots")
        first = slots[0]
        distinct = list(dict.fromkeys(slots))
        if distinct != list(range(first, first + len(distinct))):
            raise ValueError(f"the rows' slots must be consecutive in their order of first appearance, got {distinct}")
        self._reserve(max(slots) + 1, end)
        if self._native is not None:
            x = self._native(self._embed(ids.tolist() if n == 1 else ids), slots, at, self.keys, self.values)[:, None]
            return x if head is None else head(x)
        capacity = self.keys[0].shape[1]
        where = torch.tensor([slot * capacity + p for slot, p in zip(slots, at)], device=self.device)
        grouped = _QueryGroups(slots, at, end, self.device) if len(distinct) < n else None
        positions = positions.to(self.device)
        # One row reads its tables' entries as views, by Python ints; more rows gather them by tensors.
        rows, where_in_tables = (ids.tolist(), at) if n == 1 else (ids.to(self.device), positions)
        x = self._embed(rows)
        cos, sin = self._rotation(x, where_in_tables)  # (n, 1, 1, rotary dims), sin signed
        # Rows as long as the longest read every position up to `end`: no mask (the same kernel result as a mask of
        # all True, tests/test_engine.py checks it, so a row's output does not depend on its batch).
        mask = None
        if shortest != longest and grouped is None:
            mask = (torch.arange(end, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        rot, half = cos.shape[-1], cos.shape[-1] // 2
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            qkv = layer.qkv(layer.norm1(x)).view(n, heads, 3, size)
            qk = qkv[:, :, :2]
            turned = qk[..., :rot]
            # GPT-NeoX's rotate_half, cat(-t2, t1), is cat(t2, t1) times the signs that `sin` carries: the same
            # products, so the same rounding.
            turned = turned * cos + torch.cat((turned[..., half:], turned[..., :half]), dim=-1) * sin
            qk = turned if rot == size else torch.cat((turned, qk[..., rot:]), dim=-1)
            keys.view(-1, heads, size).index_copy_(0, where, qk[:, :, 1])
            values.view(-1, heads, size).index_copy_(0, where, qkv[:, :, 2])
            count = n if grouped is None else grouped.slots
            seen_keys, seen_values = keys[first : first + count, :end], values[first : first + count, :end]
            queries = qk[:, :, :1] if grouped is None else grouped.queries(qk[:, :, 0])
            attended = F.scaled_dot_product_attention(queries, seen_keys.transpose(1, 2), seen_values.transpose(1, 2),
                                                      attn_mask=mask if grouped is None else grouped.mask,
                                                      scale=layer.scaling)  # (n, heads, 1, size), or grouped
            if grouped is not None:
                attended = grouped.rows(attended)
            attended = layer.dense(attended.reshape(n, heads * size))
            if layer.parallel:  # the sums in GPTNeoXLayer's order, so they round alike
                x = layer.down(layer.act(layer.up(layer.norm2(x)))) + attended + x
            else:
                x = x + attended
                x = x + layer.down(layer.act(layer.up(layer.norm2(x))))
        x = self.final_norm(x)[:, None]
        return x if head is None else head(x)

    def _embed(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """The rows' input vectors, for `ids` as a tensor or (one row) a list."""
        if self._code_values is not None:
            return self.embed.tile(_entries(self._code_values, ids))
        ids = torch.tensor(ids, device=self.device) if isinstance(ids, list) else ids
        return self.embed(ids, dtype=self.dtype) if isinstance(self.embed, CodeLift) else self.embed(ids)

    def _rotation(self, x: torch.Tensor, positions: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (`_signed`) of each row's position, (n, 1, 1, rotary dims): looked up in a table the
        model's own rotary module computed for every position (the same values), or from the module per step when
        its rope type rescales with the length seen (dynamic rope)."""
        if self._table is None:
            positions = torch.tensor(positions, device=self.device) if isinstance(positions, list) else positions
            cos, sin = self.rotary(x[:, None], position_ids=positions[:, None])  # as GPTNeoXModel calls it
            return cos[:, :, None], _signed(sin)[:, :, None]
        cos, sin = self._table
        return _entries(cos, positions)[:, None, None], _entries(sin, positions)[:, None, None]


class _QueryGroups:
    """Rows that share slots as each slot's queries: (slots, heads, most rows of a slot, head size), padded, with a
    mask that lets each row see its slot up to its own position (and a padding query position 0, then dropped)."""

    def __init__(self, slots: list[int], positions: list[int], end: int, device):
        first = slots[0]
        seen: dict[int, int] = {}  # rows of each slot so far
        places = []
        for slot in slots:
            places.append((slot - first, seen.get(slot, 0)))
            seen[slot] = seen.get(slot, 0) + 1
        self.slots, self.most = len(seen), max(seen.values())
        self.place = torch.tensor([s * self.most + o for s, o in places], device=device)
        reach = torch.zeros(self.slots * self.most, dtype=torch.long, device=device)
        reach[self.place] = torch.tensor(positions, device=device)
        self.mask = (torch.arange(end, device=device)[None, :] <= reach[:, None]).view(self.slots, 1, self.most, end)

    def queries(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, heads, size) rows -> (slots, heads, most, size) queries."""
        n, heads, size = rows.shape
        padded = rows.new_zeros(self.slots * self.most, heads, size).index_copy_(0, self.place, rows)
        return padded.view(self.slots, self.most, heads, size).transpose(1, 2)

    def rows(self, attended: torch.Tensor) -> torch.Tensor:
        """(slots, heads, most, size) -> (n, heads, 1, size), the rows' own."""
        slots, heads, most, size = attended.shape
        return attended.transpose(1, 2).reshape(slots * most, heads, size).index_select(0, self.place)[:, :, None]


def _entries(table: torch.Tensor, index: torch.Tensor | list[int]) -> torch.Tensor:
    """table[index]: for a list of one index, a view of that entry (no gather), checked as indexing would check it."""
    if isinstance(index, torch.Tensor):
        return table[index]
    (i,) = index
    if not 0 <= i < len(table):
        raise IndexError(f"index {i} is out of bounds for a table of {len(table)} entries")
    return table[i : i + 1]
