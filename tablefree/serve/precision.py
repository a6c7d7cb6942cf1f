"""The weights a decode step multiplies by: the model's own float32 or bfloat16 weights in oneDNN's prepacked layout
(`PackedLinear`), lower-precision int8 linear layers (one scale per output channel) for the output head and the body,
and the measurement that decides whether those may run.

A decode step of a small model is bound by the bytes of weight it reads, and int8 reads a quarter of float32's.
The head multiplies int8 activations (one scale per row) by its int8 weights through oneDNN where that product is
exact, else runs torch's int8 weight-only kernel on bfloat16 activations, as the body always does. Either way each
row's output depends on that row alone, so the batch stays invariant. Quality is measured, not assumed (`measure`):
top-1 agreement with the model's own weights and the change in bits per byte over 512 positions of held-out text.
`auto` takes the fastest choice that keeps >= 98% of the top-1 choices and bits per byte within 0.5%.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..evaluate import token_byte_lengths
from . import PRECISIONS
from .native import NativeHead, native_head_unavailable

QUALITY_POSITIONS = 512  # held-out positions the quality of lower-precision weights is measured over
MIN_TOP1_AGREEMENT = 0.98
MAX_BITS_PER_BYTE_CHANGE = 0.005
# Up to this many rows the native head's product (NativeHead) is faster than oneDNN's, and beyond it slower, on this
# project's CPU machine: us per product of small-affine's head at 1 / 4 / 8 / 16 / 32 rows, 344 / 372 / 484 / 687 /
# 1,169 against oneDNN's 537 / 591 / 632 / 751 / 993. Both give the same logits, bit for bit.
NATIVE_HEAD_ROWS = 16


def per_row_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): `weight` (out x in) as int8 codes in [-127, 127] with one scale per output row, in
    `scale_dtype`. The scales are rounded to that dtype first, so the codes are quantised against the scales a kernel
    multiplies by."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(1) / 127).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return codes, scales


def output_head(model):
    """The model's output head module, or None for a model without `get_output_embeddings` (nanoGPT-style)."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


class PackedLinear:
    """A float32 or bfloat16 linear layer whose weight is kept in oneDNN's prepacked layout (a copy), multiplied by
    oneDNN's matmul without repacking it at each call.

    For the 65,536 x 256 head of small-affine on this project's CPU machine (2 threads, medians): float32 1.8-1.9 ms at
    8 rows and 4.3-5.1 at 32, against 3.9-4.0 and 5.9-6.5 for `F.linear` and 4.7 and 10.5 for the 32-slab product it
    replaces; 1.4-1.6 ms at 1 row against 1.3. bfloat16 0.72 ms at 1 row and 0.75 at 8, against 1.25 and 1.52 for
    `F.linear`, which runs the same oneDNN product after repacking the weight: the same bits. A row's output depends on
    that row alone here (checked bitwise for 1 to 64 rows, float32)."""

    def __init__(self, linear: torch.nn.Linear):
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @classmethod
    def of(cls, linear) -> PackedLinear | None:
        """The one for `linear` when it is a float32 or bfloat16 linear layer on a CPU with oneDNN, else None."""
        if (not isinstance(linear, torch.nn.Linear) or linear.weight.device.type != "cpu"
                or linear.weight.dtype not in (torch.float32, torch.bfloat16) or not packed_products()):
            return None
        return cls(linear)


@functools.cache
def packed_products() -> bool:
    """Whether this torch has oneDNN's prepacked linear product, checked against `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = torch.nn.Linear(16, 8).requires_grad_(False)
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
        return torch.allclose(PackedLinear(linear)(x), linear(x), atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN, or no such product in it
        return False


class Int8Linear:
    """A linear layer as int8 weights with one bfloat16 scale per output channel; its output has `out_dtype` (by
    default the layer's own dtype)."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype | None = None):
        self.weight, self.scales = per_row_int8(linear.weight, torch.bfloat16)  # the kernel's scales are bfloat16
        self.out_dtype = out_dtype or linear.weight.dtype
        self.bias = None if linear.bias is None else linear.bias.detach().to(self.out_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scales)
        if self.bias is not None and self.out_dtype in (torch.float32, torch.bfloat16):
            out = out + self.bias  # bfloat16 widens to float32 exactly: out.to(float32) + bias in one operation
        else:
            out = out.to(self.out_dtype)
            if self.bias is not None:
                out += self.bias  # a new tensor of its own: added in place
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], -1)


class Int8Head(Int8Linear):
    """The output head as int8 weights with one scale per vocabulary row, giving float32 logits (84% of small-affine's
    weight bytes are its head).

    Where oneDNN's int8 product runs exactly (`onednn_int8_exact`), each row of hidden states is quantised too, to int8
    with a scale of its own, and the product is integer (u8 x s8, exact in int32) times the two scales: 1.2x faster
    than the weight-only kernel at 1 row and 3-6x at 8 to 32 rows on this project's CPU machine, and a row's logits
    depend on that row alone. Where the native library builds, it quantises the rows (the same codes) and, up to
    NATIVE_HEAD_ROWS rows, multiplies them too (NativeHead: exact sums, so the same logits, bit for bit).
    Elsewhere the weight-only kernel (Int8Linear, bfloat16 activations) runs."""

    def __init__(self, head: torch.nn.Linear):
        self.packed = None
        if not onednn_int8_exact():
            super().__init__(head, out_dtype=torch.float32)
            return
        self.out_dtype = torch.float32
        codes, self.scales = per_row_int8(head.weight, torch.float32)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, [1, codes.shape[1]])
        self.weight = None  # oneDNN's own layout (`packed`), and the native head's, are the copies kept
        self.zero_points = torch.zeros(codes.shape[0], dtype=torch.long)
        self.bias = None if head.bias is None else head.bias.detach().float()
        fits = native_head_unavailable() is None and codes.shape[1] % 4 == 0
        self.native = NativeHead(codes, self.scales, self.bias) if fits else None

    @property
    def kind(self) -> str:
        if self.packed is None:
            return "int8 weights"
        if self.native is None:
            return "int8 weights and activations (oneDNN)"
        return f"int8 weights and activations (native up to {NATIVE_HEAD_ROWS} rows, then oneDNN)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return super().__call__(x)
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.native is not None:
            codes, scale = self.native.quantize(rows.contiguous())
            if len(rows) <= NATIVE_HEAD_ROWS:
                return self.native(codes, scale).reshape(*x.shape[:-1], -1)
            scale = scale[:, None]
        else:
            # A NaN or infinite row gives a non-finite scale, so its logits are non-finite too (the sampler screens
            # them).
            scale = (torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True) / 127).clamp_(
                min=torch.finfo(torch.float32).tiny)
            # |rows / scale| <= 127 up to a rounding of the division, so the rounded codes lie in [-127, 127].
            codes = torch.round(rows / scale).add_(128).to(torch.uint8)
        out = integer_product(codes, self.packed, self.scales, self.zero_points)
        out.mul_(scale)
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], -1)

    @classmethod
    def of(cls, model) -> Int8Head | None:
        """The one for `model`'s head when it is a linear layer on a CPU, else None."""
        head = output_head(model)
        if not isinstance(head, torch.nn.Linear) or head.weight.device.type != "cpu":
            return None
        return cls(head)


def integer_product(codes: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor) -> torch.Tensor:
    """oneDNN's product of uint8 `codes` (zero point 128, so codes - 128 in [-127, 127]) and int8 weights prepacked by
    `torch.ops.onednn.qlinear_prepack`, summed in int32, as float32 times each output channel's scale."""
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, scales, zero_points, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether oneDNN's u8 x s8 product runs here and gives exact integer sums, at the extremes and for any number of
    rows. CPUs without VNNI (or AMX) sum pairs of products in 16 bits with saturation, which is not exact: there, and
    where oneDNN is missing, the weight-only kernel runs instead."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randint(-127, 128, (96, 256), dtype=torch.int8, generator=generator)
        weight[:32] = 127  # every pair of products at its largest: 2 x 255 x 127 overflows 16 bits
        weight[32:48] = -127
        packed = torch.ops.onednn.qlinear_prepack(weight, [1, 256])
        for rows in (1, 3, 32):
            codes = torch.randint(0, 256, (rows, 256), dtype=torch.uint8, generator=generator)
            codes[0] = 255
            got = integer_product(codes, packed, torch.ones(96), torch.zeros(96, dtype=torch.long))
            want = (codes.double() - 128) @ weight.double().t()  # sums below 2**24: exact in float32 too
            if not torch.equal(got.double(), want):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN, or no int8 product in it
        return False


def body_linears(model) -> list[torch.nn.Linear]:
    """The linear layers of a GPT-NeoX-shaped model's blocks (attention and MLP), the ones int8 body weights replace."""
    return [module for layer in model.gpt_neox.layers for module in layer.modules() if isinstance(module, torch.nn.Linear)]


@contextlib.contextmanager
def without_onednn():
    """oneDNN off inside (torch's process-wide switch, restored on the way out; a server computes in one thread, its
    engine's, so nothing else runs meanwhile). torch sends a float32 gelu to oneDNN, which costs about 9 us a call
    whatever the size; ATen's own vectorised kernel costs 1.5 us for a decode step's row. The two differ by up to
    1e-6, so only int8 body weights, already a different arithmetic, run it (`lower_activation`, and `int8_body` for
    the quality measurement). oneDNN's int8 head product is called by name and runs either way."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def lower_activation(act):
    """A block's activation as int8 body weights run it: `act` without oneDNN (`without_onednn`)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with without_onednn():
            return act(x)

    return run


@contextlib.contextmanager
def int8_body(model):
    """Runs the model's block linears as int8 weights inside the block, as the engine's decode step would: the native
    body's products (NativeLinear) where it runs this model, else Int8Linear with the activation without oneDNN."""
    from .native import NativeLinear, native_problem

    lower = NativeLinear if native_problem(model) is None else Int8Linear
    linears = body_linears(model)
    for linear in linears:
        linear.forward = lower(linear)  # an instance attribute: removed on the way out
    try:
        with without_onednn():
            yield
    finally:
        for linear in linears:
            del linear.forward


@dataclass
class Quality:
    """Lower-precision weights against the model's own over held-out text."""

    positions: int
    top1_agreement: float  # share of positions whose most likely next token is the same
    bits_per_byte: float  # the model's own weights
    bits_per_byte_lower: float  # the lower-precision ones

    @property
    def bits_per_byte_change(self) -> float:
        return self.bits_per_byte_lower / self.bits_per_byte - 1

    @property
    def equal(self) -> bool:
        return self.top1_agreement >= MIN_TOP1_AGREEMENT and abs(self.bits_per_byte_change) <= MAX_BITS_PER_BYTE_CHANGE

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1_agreement:.1%}, bits per byte {self.bits_per_byte_change:+.2%} over "
                f"{self.positions} held-out positions")


def held_out_ids(tokenizer, count: int) -> list[int]:
    """`count` token ids of held-out text that ships with Python (python-notes), the same on every machine."""
    from ..corpus import python_notes_documents

    ids: list[int] = []
    for document in python_notes_documents():
        # A prefix long enough for `count` tokens of any tokenizer (none takes 16 characters per token here).
        ids += tokenizer.encode(document[: 16 * count], add_special_tokens=False)
        if len(ids) >= count:
            break
    return ids[:count]


@torch.no_grad()
def measure(model, tokenizer, head=None, lower_body: bool = False, positions: int = QUALITY_POSITIONS,
            context: int | None = None) -> Quality:
    """Top-1 agreement and bits per byte of the model with the output head `head` (None: its own) and, if
    `lower_body`, int8 block linears, against the model as loaded, over `positions` next-token predictions of
    held-out text in windows of the model's context."""
    base, own_head = model.base_model, model.get_output_embeddings()
    head = head or own_head
    context = context or getattr(model.config, "max_position_embeddings", None) or positions + 1
    ids = held_out_ids(tokenizer, positions + -(-positions // (context - 1)))
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)  # as `tablefree eval` counts them
    device = next(model.parameters()).device
    windows, counted = [], 0
    for start in range(0, len(ids) - 1, context):
        window = ids[start : start + context][: positions - counted + 1]
        if len(window) < 2:
            break
        windows.append(window)
        counted += len(window) - 1
    inputs = [torch.tensor([window], device=device) for window in windows]
    hidden = [base(input_ids=x).last_hidden_state[0, :-1] for x in inputs]
    lower_hidden = hidden
    if lower_body:
        with int8_body(model):  # quantised once for every window
            lower_hidden = [base(input_ids=x).last_hidden_state[0, :-1] for x in inputs]
    agree, nats, n_bytes = 0, {"own": 0.0, "lower": 0.0}, 0
    for window, own_hidden, low_hidden in zip(windows, hidden, lower_hidden):
        targets = torch.tensor(window[1:], device=device)
        own, low = own_head(own_hidden).float(), head(low_hidden).float()
        agree += int((own.argmax(-1) == low.argmax(-1)).sum())
        for name, logits in (("own", own), ("lower", low)):
            nats[name] += float(F.cross_entropy(logits, targets, reduction="sum"))
        n_bytes += int(byte_lengths[window[1:]].sum())
    scale = 1 / math.log(2) / max(1, n_bytes)
    return Quality(counted, agree / max(1, counted), nats["own"] * scale, nats["lower"] * scale)


@dataclass
class Precision:
    """What the engine runs: `head` in place of the model's own (None: its own), int8 block linears in decode steps
    if `lower_body`, and why."""

    head: Int8Head | None
    lower_body: bool
    why: str


def choose_precision(model, tokenizer, head: str = "float32", body: str = "float32", body_possible: str | None = None
                     ) -> Precision:
    """The weights to serve `model` with, for the head's and the body's precision (each one of PRECISIONS).
    `body_possible`: why int8 body weights cannot run (the engine's decode step does not take this model), or None.
    `auto` tries the faster choices first and takes the first that measures equal to the model's own weights."""
    for name, value in (("head", head), ("body", body)):
        if value not in PRECISIONS:
            raise ValueError(f"unknown {name} precision {value!r}; choose {', '.join(PRECISIONS)}")
    int8_head = Int8Head.of(model) if head != "float32" else None
    if head == "int8" and int8_head is None:
        raise ValueError("an int8 head needs a linear output head on the CPU; use head precision float32")
    if body == "int8" and body_possible:
        raise ValueError(f"int8 body weights need the engine's GPT-NeoX decode step, and {body_possible}; "
                         f"use body precision float32")
    cpu = next(model.parameters()).device.type == "cpu"
    if body == "int8" and not cpu:
        raise ValueError("int8 body weights run only on a CPU; use body precision float32")
    heads = [int8_head] if head == "int8" else [None] if head == "float32" or int8_head is None else [int8_head, None]
    bodies = ([True] if body == "int8" else [False] if body == "float32" or body_possible or not cpu else [True, False])
    refused = []
    for choice in heads:  # the head is most of what a step reads: an int8 head first
        for lower_body in bodies:
            what = ", ".join(part for part, low in (("int8 head", choice is not None), ("int8 body", lower_body)) if low)
            if not what:
                suffix = f" (auto): {'; '.join(refused)}" if refused else ""
                return Precision(None, False, f"the model's own weights{suffix}")
            asked = (choice is None or head == "int8") and (not lower_body or body == "int8")
            if asked:
                return Precision(choice, lower_body, f"{what}: asked for")
            quality = measure(model, tokenizer, choice, lower_body)
            if quality.equal:
                return Precision(choice, lower_body, f"{what} (auto): {quality.describe()}")
            refused.append(f"{what} would give {quality.describe()}")
    raise AssertionError("unreachable: float32 weights end the search")
