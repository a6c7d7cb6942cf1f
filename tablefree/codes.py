"""Fixed token codes and their parameter-free lift to the model width.

A code maps a token id t in [0, V) to K' >= K = ceil(log2 V) bits, most significant first.
Every family here is computed from the id with a few integer ops, holds no table, no buffer and
no trainable parameter, and is injective with an exact inverse. This file imports only torch
and the standard library because it ships inside every saved model directory.

Bit order: a code is a list of bits c_0 .. c_{K'-1}, c_0 the most significant; an affine row bitmask
holds column j of its row at bit K'-1-j, so row i applied to t is parity(t AND row).

Adding a code family = one `Code` subclass below, its entry in `CODE_FAMILIES` and its arguments in
`build_code`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CODE_LAYOUTS = ("tile", "interleave")
CODE_VALUES = ("binary", "bipolar")
AFFINE_PRESETS = ("identity", "gray")
MAX_CODE_BITS = 62  # int64 arithmetic with headroom for the split multiply below


class CodeError(ValueError):
    """A code or lift setting that cannot work; the message names the setting and what is accepted."""


def code_bits_for(vocab_size: int) -> int:
    """K = ceil(log2 V), the fewest bits that identify every token."""
    if vocab_size < 2:
        raise CodeError(f"vocab_size must be at least 2, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


# ---------------------------------------------------------------- deterministic integer streams


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: the seed stream behind every drawn code, stable on any platform."""
    mask = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


def _random_words(seed: int, count: int, bits: int) -> list[int]:
    """`count` SplitMix64 outputs from `seed` (taken mod 2**64), each masked to its low `bits` bits."""
    state, words = seed & ((1 << 64) - 1), []
    for _ in range(count):
        state, value = _splitmix64(state)
        words.append(value & ((1 << bits) - 1))
    return words


# ---------------------------------------------------------------- GF(2) linear algebra on row bitmasks


def gf2_inverse(rows: list[int], k: int) -> list[int] | None:
    """Inverse of the K x K matrix whose row i is the bitmask rows[i] (bit K-1-j = column j); None if singular."""
    work = [(rows[i], 1 << (k - 1 - i)) for i in range(k)]
    for col in range(k):
        bit = 1 << (k - 1 - col)
        pivot = next((r for r in range(col, k) if work[r][0] & bit), None)
        if pivot is None:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        for r in range(k):
            if r != col and work[r][0] & bit:
                work[r] = (work[r][0] ^ work[col][0], work[r][1] ^ work[col][1])
    return [inverse for _, inverse in work]


def gf2_rank(rows: list[int], k: int) -> int:
    """Rank over GF(2) of the rows given as bitmasks (to name how singular a refused matrix is)."""
    basis: list[int] = []
    for row in rows:
        for b in basis:
            row = min(row, row ^ b)
        if row:
            basis.append(row)
    return len(basis)


def draw_affine(k: int, seed: int) -> tuple[list[int], int]:
    """(A, b) with A uniform over GL(K, 2) (draw, reject singular) and b uniform, from `seed`."""
    attempt = 0
    while True:
        words = _random_words(seed * 1_000_003 + attempt, k + 1, k)
        rows, offset = words[:k], words[k]
        if gf2_inverse(rows, k) is not None:
            return rows, offset
        attempt += 1


def affine_preset(name: str, k: int) -> tuple[list[int], int]:
    """Named affine codes: `identity` is the minimal code, `gray` the reflected Gray code t ^ (t >> 1)."""
    if name == "identity":
        return [1 << (k - 1 - i) for i in range(k)], 0
    if name == "gray":
        return [(1 << (k - 1 - i)) | ((1 << (k - i)) if i > 0 else 0) for i in range(k)], 0
    raise CodeError(f"unknown affine preset {name!r}; choose one of {', '.join(AFFINE_PRESETS)}")


# ---------------------------------------------------------------- integer ops on int64 tensors


def _parity(x: torch.Tensor) -> torch.Tensor:
    """Parity of each non-negative int64 (popcount mod 2) by xor folding."""
    for shift in (32, 16, 8, 4, 2, 1):
        x = x ^ (x >> shift)
    return x & 1


def _mul_mod(x: torch.Tensor, m: int, bits: int) -> torch.Tensor:
    """x * m mod 2**bits for x, m < 2**bits <= 2**62, without int64 overflow (split into 31-bit halves)."""
    low_mask = (1 << 31) - 1
    xl, xh = x & low_mask, x >> 31
    ml, mh = m & low_mask, m >> 31
    out = xl * ml
    if bits > 31:
        cross = (xl * mh + xh * ml) & ((1 << (bits - 31)) - 1)
        out = out + (cross << 31)
    return out & ((1 << bits) - 1)


def _bits_msb_first(x: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits - 1, -1, -1, device=x.device, dtype=torch.int64)
    return (x.unsqueeze(-1) >> shifts) & 1


def _pack_msb_first(code: torch.Tensor) -> torch.Tensor:
    bits = code.shape[-1]
    weights = torch.ones(bits, dtype=torch.int64, device=code.device) << torch.arange(
        bits - 1, -1, -1, device=code.device, dtype=torch.int64
    )
    return (code.to(torch.int64) * weights).sum(-1)


# ---------------------------------------------------------------- the code families


class Code:
    """A fixed injective map from ids in [0, vocab_size) to `bits` bits (int64 0/1, MSB first)."""

    family: str = ""

    def __init__(self, vocab_size: int, bits: int):
        k = code_bits_for(vocab_size)
        if bits < k:
            raise CodeError(
                f"code width {bits} bits is too small for vocab_size {vocab_size}: needs at least K = {k}"
            )
        if bits > MAX_CODE_BITS:
            raise CodeError(f"code width {bits} bits is above the supported maximum of {MAX_CODE_BITS}")
        self.vocab_size, self.bits = vocab_size, bits

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.family} code, V={self.vocab_size}, {self.bits} bits"


class MinimalCode(Code):
    """c(t) = bin_K(t): the id's own bits."""

    family = "minimal"

    def __init__(self, vocab_size: int, bits: int):
        super().__init__(vocab_size, bits)
        if bits != code_bits_for(vocab_size):
            raise CodeError(
                f"the minimal code has exactly K = {code_bits_for(vocab_size)} bits for vocab_size "
                f"{vocab_size}, got code_bits={bits}; use the hashed family for wider codes"
            )

    def encode(self, ids):
        return _bits_msb_first(ids.to(torch.int64), self.bits)

    def decode(self, code):
        return _pack_msb_first(code)


class AffineCode(Code):
    """c~(t) = A c(t) xor b over GF(2); row i of A is the bitmask rows[i] applied to t itself."""

    family = "affine"

    def __init__(self, vocab_size: int, bits: int, rows: list[int], offset: int):
        super().__init__(vocab_size, bits)
        if len(rows) != bits:
            raise CodeError(f"affine_rows has {len(rows)} rows; an affine code of {bits} bits needs {bits}")
        if any(not 0 <= r < (1 << bits) for r in rows) or not 0 <= offset < (1 << bits):
            raise CodeError(f"affine_rows and affine_offset must be {bits}-bit non-negative integers")
        inverse = gf2_inverse(list(rows), bits)
        if inverse is None:
            raise CodeError(
                f"affine_rows is singular over GF(2) (rank {gf2_rank(list(rows), bits)} < {bits}): "
                "the matrix A must be invertible; remove affine_rows to redraw it from code_seed"
            )
        self.rows, self.offset, self.inverse_rows = list(rows), offset, inverse
        self._device_tensors: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        # Built lazily from the integers on the device where ids live; never a module buffer.
        if device not in self._device_tensors:
            offset = torch.tensor(self.offset, dtype=torch.int64, device=device)
            self._device_tensors[device] = {
                "rows": torch.tensor(self.rows, dtype=torch.int64, device=device),
                "inverse_rows": torch.tensor(self.inverse_rows, dtype=torch.int64, device=device),
                "offset": offset,
                "offset_bits": _bits_msb_first(offset, self.bits),
            }
        return self._device_tensors[device]

    def encode(self, ids):
        tensors = self._tensors(ids.device)
        return _parity(ids.to(torch.int64).unsqueeze(-1) & tensors["rows"]) ^ tensors["offset_bits"]

    def decode(self, code):
        tensors = self._tensors(code.device)
        return _pack_msb_first(_parity((_pack_msb_first(code) ^ tensors["offset"]).unsqueeze(-1) & tensors["inverse_rows"]))


class HashedCode(Code):
    """Pseudorandom codes of any width K' >= K: a keyed bijection of K'-bit integers applied to the id.

    Each round adds a key word, xorshifts and multiplies by a key-derived odd number mod 2**K';
    every step is invertible, so the code is injective and decodes exactly.
    """

    family = "hashed"
    rounds = 4

    def __init__(self, vocab_size: int, bits: int, key: int):
        super().__init__(vocab_size, bits)
        words = _random_words(key ^ 0x7AB1EF5EED, 2 * self.rounds, bits)
        self.adds = words[: self.rounds]
        self.muls = [w | 1 for w in words[self.rounds :]]
        self.inverse_muls = [pow(m, -1, 1 << bits) for m in self.muls]
        self.shift = max(1, (bits + 1) // 2)
        self.key = key

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        for add, mul in zip(self.adds, self.muls):
            x = (x + add) & mask
            x = x ^ (x >> self.shift)
            x = _mul_mod(x, mul, self.bits)
        return x

    def _backward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        for add, inverse_mul in zip(reversed(self.adds), reversed(self.inverse_muls)):
            x = _mul_mod(x, inverse_mul, self.bits)
            undone, shift = x, self.shift
            while shift < self.bits:
                undone = undone ^ (x >> shift)
                shift += self.shift
            x = (undone - add) & mask
        return x

    def encode(self, ids):
        return _bits_msb_first(self._forward(ids.to(torch.int64)), self.bits)

    def decode(self, code):
        return self._backward(_pack_msb_first(code))


CODE_FAMILIES = {"minimal": MinimalCode, "affine": AffineCode, "hashed": HashedCode}


def build_code(
    family: str,
    vocab_size: int,
    bits: int | None = None,
    *,
    seed: int = 0,
    affine_preset_name: str | None = None,
    rows: list[int] | None = None,
    offset: int | None = None,
) -> Code:
    """The code named by `family`; an affine code uses stored rows, else a preset, else a draw from `seed`."""
    if family not in CODE_FAMILIES:
        raise CodeError(f"unknown code family {family!r}; choose one of {', '.join(CODE_FAMILIES)}")
    bits = code_bits_for(vocab_size) if bits is None else int(bits)
    if family == "minimal":
        return MinimalCode(vocab_size, bits)
    if family == "hashed":
        return HashedCode(vocab_size, bits, seed)
    if rows is None:
        if bits > MAX_CODE_BITS or bits < 1:
            raise CodeError(f"code width {bits} bits is outside 1..{MAX_CODE_BITS}")
        rows, drawn_offset = affine_preset(affine_preset_name, bits) if affine_preset_name else draw_affine(bits, seed)
        offset = drawn_offset if offset is None else offset
    return AffineCode(vocab_size, bits, list(rows), 0 if offset is None else int(offset))


def verify_code(code: Code, chunk: int = 1 << 20) -> None:
    """Exhaustive check over all V ids: the code is injective and decode(encode(t)) == t. Raises CodeError."""
    if code.bits > MAX_CODE_BITS:
        raise CodeError(f"code width {code.bits} exceeds {MAX_CODE_BITS}")
    packed = []
    for start in range(0, code.vocab_size, chunk):
        ids = torch.arange(start, min(start + chunk, code.vocab_size), dtype=torch.int64)
        bits = code.encode(ids)
        if bits.shape != (ids.numel(), code.bits) or bool(((bits != 0) & (bits != 1)).any()):
            raise CodeError(f"{code.describe()}: encode did not return {code.bits} bits of 0/1 per id")
        back = code.decode(bits)
        wrong = (back != ids).nonzero()
        if wrong.numel():
            t = int(ids[wrong[0, 0]])
            raise CodeError(f"{code.describe()}: decode(encode({t})) = {int(back[wrong[0, 0]])}, not {t}")
        packed.append(_pack_msb_first(bits))
    distinct = torch.unique(torch.cat(packed)).numel()
    if distinct != code.vocab_size:
        raise CodeError(f"{code.describe()}: only {distinct} distinct codes for {code.vocab_size} ids")


# ---------------------------------------------------------------- the lift to the model width


class CodeLift(nn.Module):
    """Token ids -> fixed vectors of width d from their code bits: zero parameters, zero buffers.

    values: `binary` maps a bit to {0, 1}, `bipolar` to {-1, +1}; times `scale`.
    layout: `tile` x_j = v(c_{j mod K}); `interleave` x_j = v(c_{floor(j K / d)}) (needs K | d).
    """

    def __init__(self, code: Code, hidden_size: int, layout: str = "tile", values: str = "binary", scale: float = 1.0):
        super().__init__()
        if layout not in CODE_LAYOUTS:
            raise CodeError(f"unknown code_layout {layout!r}; choose one of {', '.join(CODE_LAYOUTS)}")
        if values not in CODE_VALUES:
            raise CodeError(f"unknown code_values {values!r}; choose one of {', '.join(CODE_VALUES)}")
        if hidden_size < code.bits:
            raise CodeError(f"hidden_size {hidden_size} is narrower than the code ({code.bits} bits)")
        if layout == "interleave" and hidden_size % code.bits:
            raise CodeError(
                f"code_layout 'interleave' needs hidden_size divisible by the code width: "
                f"{hidden_size} % {code.bits} = {hidden_size % code.bits}; use 'tile' or a width that "
                f"is a multiple of {code.bits}"
            )
        self.code, self.layout, self.values, self.scale = code, layout, values, float(scale)
        self.num_embeddings, self.embedding_dim = code.vocab_size, hidden_size

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if input_ids.dtype.is_floating_point:
            raise TypeError(f"CodeLift takes integer token ids, got a {input_ids.dtype} tensor")
        return self.tile(self.code_values(self.code.encode(input_ids), dtype))

    def code_values(self, bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., K) code bits -> their K values (`values` and `scale`), before the layout widens them to d."""
        bits = bits.to(dtype)
        return bits * (2 * self.scale) - self.scale if self.values == "bipolar" else bits * self.scale

    def tile(self, values: torch.Tensor) -> torch.Tensor:
        """(..., K) code values -> (..., d) vectors by the layout."""
        k, d = self.code.bits, self.embedding_dim
        if self.layout == "interleave":
            return values.repeat_interleave(d // k, dim=-1)
        repeats = -(-d // k)
        return values.unsqueeze(-2).expand(*values.shape[:-1], repeats, k).reshape(*values.shape[:-1], repeats * k)[..., :d]

    def table(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The (V, d) matrix of every token's vector: a constant, the stock GPT-NeoX `embed_in.weight`."""
        return self(torch.arange(self.num_embeddings, device=device), dtype=dtype)

    def extra_repr(self) -> str:
        return f"{self.code.describe()}, d={self.embedding_dim}, layout={self.layout}, values={self.values}, scale={self.scale}"
