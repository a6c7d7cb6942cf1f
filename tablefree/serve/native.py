"""The native body: a decode step's blocks with int8 weights as one call into C (native_step.c), built on first use;
with it the int8 head's product (NativeHead) and the draw of plain sampled rows (native_draw).

A one-row decode step through torch makes about 20 tensor operations per layer, each costing microseconds of dispatch
whatever its size; for small-affine that was 0.65 ms of a 1.5 ms step, more than its arithmetic
(docs/architecture.md, "The native body"). native_step.c runs the same blocks as plain loops in one call.

It is built with the machine's C compiler (`CC`, else `cc`) for this CPU (-O3 -march=native, OpenMP), once, into
tablefree's cache folder (`TABLEFREE_CACHE`, else $XDG_CACHE_HOME/tablefree, else ~/.cache/tablefree), named by a
hash of the source, the flags and the compiler's target, so a new CPU or source builds anew. Written to a temporary
name and renamed: two processes building at once never load a half-written library. Where no compiler works the
engine runs torch's int8 kernels instead, and says why (`native_unavailable`). TABLEFREE_NATIVE=0 turns it off.

OpenMP: the library links `libgomp.so.1`, which torch has already loaded, so its threads are torch's own pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_step.c")
# -ffp-contract=off: no multiply-add fused unless written so (native_step.c's `madd`), so a sum rounds the same way
# on every path through the code.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", "-std=gnu11"]
# config.hidden_act -> native_step.c's activation (ACT_GELU, ACT_GELU_TANH, ACT_RELU, ACT_SILU)
ACTIVATIONS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu_fast": 1, "relu": 2, "silu": 3, "swish": 3}


def cache_folder() -> Path:
    if os.environ.get("TABLEFREE_CACHE"):
        return Path(os.environ["TABLEFREE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tablefree"


class NativeBuildError(Exception):
    """The library could not be built or loaded: the message says why."""


def _target(compiler: str) -> bytes:
    """What -march=native means to this compiler on this CPU (its predefined macros), for the library's name."""
    done = subprocess.run([compiler, "-march=native", "-E", "-dM", "-x", "c", os.devnull], capture_output=True,
                          timeout=60, check=False)
    return done.stdout if done.returncode == 0 else b""


def build(flags: list[str] = FLAGS) -> Path:
    """The library built from SOURCE with `flags`, in the cache folder (built there first if need be)."""
    name = os.environ.get("CC") or "cc"
    compiler = shutil.which(name)
    if compiler is None:
        raise NativeBuildError(f"no C compiler ({name}) on PATH; set CC to one")
    try:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _target(compiler) + compiler.encode())
        folder = cache_folder() / "native"
        path = folder / f"step-{key.hexdigest()[:20]}.so"
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as work:  # built aside, then renamed into place whole
            built = Path(work) / path.name
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                  text=True, timeout=600, check=False)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                raise NativeBuildError(f"{name} failed ({lines[-1] if lines else f'exit status {done.returncode}'})")
            os.replace(built, path)
        return path
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:  # RuntimeError: no home folder for the cache
        raise NativeBuildError(f"building with {name}: {type(exc).__name__}: {exc}") from None


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions typed."""
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"loading {path}: {exc}") from None
    pointer, count = ctypes.c_void_p, ctypes.c_int
    for name in ("tf_lanes", "tf_scratch_floats", "tf_body", "tf_linear", "tf_quantize_rows", "tf_head",
                 "tf_exp_shifted", "tf_draw", "tf_head_vectorised"):
        if not hasattr(library, name):
            raise NativeBuildError(f"loading {path}: it has no {name}")
    for name, result, arguments in (
        ("tf_lanes", count, []),
        ("tf_scratch_floats", ctypes.c_long, [pointer, count]),
        ("tf_body", count, [pointer] * 3 + [count] + [pointer] * 4),
        ("tf_linear", None, [pointer, count, count, pointer, pointer, pointer, count, pointer]),
        ("tf_quantize_rows", None, [pointer, count, count, pointer, pointer]),
        ("tf_head", None, [pointer, count, count] + [pointer] * 5 + [count, pointer]),
        ("tf_exp_shifted", ctypes.c_float, [pointer, count, ctypes.c_float, ctypes.c_float]),
        ("tf_draw", None, [pointer, count, count] + [pointer] * 5),
        ("tf_head_vectorised", count, []),
    ):
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


class _Build:
    """The loaded library, or why there is none."""

    def __init__(self):
        self.library: ctypes.CDLL | None = None
        self.problem: str | None = None
        self.lanes = 0
        if os.environ.get("TABLEFREE_NATIVE", "1") == "0":
            self.problem = "TABLEFREE_NATIVE=0"
            return
        try:
            path = build()
            try:
                self.library = load(path)
            except NativeBuildError:  # a damaged file where the library should be (ours): built again
                path.unlink(missing_ok=True)
                self.library = load(build())
        except NativeBuildError as exc:
            self.problem = str(exc)
            return
        self.lanes = self.library.tf_lanes()


@functools.cache
def _build() -> _Build:
    return _Build()


def native_head_unavailable() -> str | None:
    """Why the int8 head's product does not run natively here (the library does not build, or this CPU lacks
    AVX-512 VNNI, where oneDNN's product is the faster), or None when it does."""
    build = _build()
    if build.problem:
        return build.problem
    return None if build.library.tf_head_vectorised() else "no AVX-512 VNNI on this CPU"


def native_unavailable() -> str | None:
    """Why the native body cannot run here, or None when it can (building it on first call)."""
    return _build().problem


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def blocked(codes: torch.Tensor) -> torch.Tensor:
    """int8 `codes` (out x in) in native_step.c's layout: blocks of LANES outputs, each holding for every input the
    LANES outputs' weights side by side (out / LANES, in, LANES), LANES being the library's vector width."""
    lanes = _build().lanes
    out, width = codes.shape
    if out % lanes:
        raise ValueError(f"{out} outputs (native: a multiple of {lanes})")
    return codes.view(out // lanes, lanes, width).transpose(1, 2).contiguous()


def native_problem(model) -> str | None:
    """Why `model`'s int8 body cannot run natively here, or None when it can: the library must build, and the model
    must be what native_step.c computes (float32 weights on the CPU, GPT-NeoX's own rotary embedding with a fixed
    table, an activation it knows, widths that are whole blocks of its vectors, norms with biases)."""
    problem = native_unavailable()
    if problem:
        return problem
    config, base = model.config, model.gpt_neox
    if getattr(base.rotary_emb, "rope_type", None) != "default":
        return f"rope type {getattr(base.rotary_emb, 'rope_type', None)!r} (native: 'default')"
    if config.hidden_act not in ACTIVATIONS:
        return f"activation {config.hidden_act!r} (native: {', '.join(ACTIVATIONS)})"
    lanes = _build().lanes
    layers = base.layers
    outputs = {linear.out_features for layer in layers for linear in (layer.attention.query_key_value,
                                                                      layer.attention.dense, layer.mlp.dense_h_to_4h,
                                                                      layer.mlp.dense_4h_to_h)}
    if any(out % lanes for out in outputs):
        return f"layer widths {sorted(outputs)} (native: multiples of {lanes})"
    if len({layer.use_parallel_residual for layer in layers}) > 1 or len({layer.mlp.dense_h_to_4h.out_features
                                                                          for layer in layers}) > 1:
        return "layers of different shapes"
    for tensor in list(base.parameters()):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            return f"weights of {tensor.dtype} on {tensor.device} (native: float32 on the CPU)"
    norms = [base.final_layer_norm] + [norm for layer in layers
                                       for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(norm.weight is None or norm.bias is None for norm in norms):
        return "layer norms without weights or biases"
    return None


class NativeLinear:
    """An int8 linear layer as native_step.c computes it (one float32 scale per output channel, float32 sums), for
    the quality measurement's forward passes: the same products a native decode step makes."""

    def __init__(self, linear: torch.nn.Linear):
        from .precision import per_row_int8

        codes, self.scales = per_row_int8(linear.weight, torch.float32)
        self.weight, self.outputs = blocked(codes), codes.shape[0]
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.out_dtype = linear.weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()
        n, width = rows.shape
        if width != self.weight.shape[1]:
            raise ValueError(f"rows of {width} values for a layer of {self.weight.shape[1]} inputs")
        out = torch.empty(n, self.outputs)
        _build().library.tf_linear(rows.data_ptr(), n, width, self.weight.data_ptr(), self.scales.data_ptr(),
                                   _pointer(self.bias), self.outputs, out.data_ptr())
        return out.to(self.out_dtype).reshape(*x.shape[:-1], -1)


class NativeBody:
    """A SlotDecoder's blocks and final layer norm for native_step.c: int8 copies of the block weights and pointers
    to everything else (the model's own norms and biases, the decoder's rotary tables and cache). For a model
    `native_problem` passes."""

    def __init__(self, model, cos: torch.Tensor, sin: torch.Tensor):
        base = model.gpt_neox
        config = model.config
        first = base.layers[0]
        self.width = config.hidden_size
        self.shape = torch.tensor([len(base.layers), self.width, config.num_attention_heads,
                                   self.width // config.num_attention_heads, cos.shape[-1],
                                   first.mlp.dense_h_to_4h.out_features, int(first.use_parallel_residual),
                                   ACTIVATIONS[config.hidden_act], 0, 0, len(cos)], dtype=torch.int64)
        self.floats = torch.tensor([first.input_layernorm.eps, first.attention.scaling,
                                    base.final_layer_norm.eps], dtype=torch.float32)
        fixed = [cos.contiguous(), sin.contiguous(), base.final_layer_norm.weight, base.final_layer_norm.bias]
        self._layers = []
        for layer in base.layers:
            parts = [layer.input_layernorm.weight, layer.input_layernorm.bias, layer.post_attention_layernorm.weight,
                     layer.post_attention_layernorm.bias]
            for linear in (layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h,
                           layer.mlp.dense_4h_to_h):
                native = NativeLinear(linear)
                parts += [native.weight, native.scales, native.bias]
            self._layers.append([t.detach() if t is not None else None for t in parts])
        self._fixed = [t.detach() for t in fixed]
        self._cache_key = None
        self._pointers = None
        self._scratch = torch.empty(0)

    def _bind(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        key = tuple(t.data_ptr() for t in keys + values)
        if key == self._cache_key:
            return
        layers, heads, size = (int(v) for v in self.shape[[0, 2, 3]])
        if len(keys) != layers or len(values) != layers:
            raise ValueError(f"a cache of {len(keys)} layers for a model of {layers}")
        for t in keys + values:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != keys[0].shape or t.shape[2:] != (
                    heads, size):
                raise ValueError(f"the cache must be contiguous float32 tensors of (slots, positions, {heads}, {size})")
        pointers = [_pointer(t) for t in self._fixed]
        for parts, k, v in zip(self._layers, keys, values):
            pointers += [_pointer(t) for t in parts] + [k.data_ptr(), v.data_ptr()]
        self._pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.shape[8], self.shape[9] = keys[0].shape[0], keys[0].shape[1]
        self._cache_key = key

    def __call__(self, x: torch.Tensor, slots: list[int], positions: list[int], keys: list[torch.Tensor],
                 values: list[torch.Tensor]) -> torch.Tensor:
        """The final layer norm's output (n, width) for input vectors `x` (n, width) of rows at `slots` and
        `positions`; writes each row's keys and values into `keys` and `values`."""
        self._bind(keys, values)
        n = len(slots)
        library = _build().library
        out = torch.empty(n, self.width)
        out.copy_(x.reshape(n, self.width))
        need = library.tf_scratch_floats(self.shape.data_ptr(), n)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need)
        done = library.tf_body(self.shape.data_ptr(), self._pointers, self.floats.data_ptr(), n,
                               (ctypes.c_int32 * n)(*slots), (ctypes.c_int32 * n)(*positions), out.data_ptr(),
                               self._scratch.data_ptr())
        if done != 0:
            raise IndexError(f"a position in {positions} or a slot in {slots} is outside the cache")
        return out


HEAD_GROUP = 64  # outputs tf_head computes together; its weights are padded to a multiple of this


class NativeHead:
    """The int8 output head's product as native_step.c computes it: uint8 codes of each row (zero point 128) times
    int8 weights, summed exactly in int32, then the weight's and the row's scales. Exact sums, so the same logits as
    oneDNN's product, bit for bit (tests/test_native.py); faster for a few rows, slower for many (NATIVE_HEAD_ROWS)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        out, width = codes.shape
        if width % 4:
            raise ValueError(f"width {width} (native head: a multiple of 4)")
        padded = -(-out // HEAD_GROUP) * HEAD_GROUP
        full = torch.zeros(padded, width, dtype=torch.int8)
        full[:out] = codes
        self.weight = full.view(padded // 16, 16, width // 4, 4).transpose(1, 2).contiguous()
        self.sums = (full.int().sum(1) * 128).int().contiguous()
        self.scales = torch.zeros(padded)
        self.scales[:out] = scales
        self.bias = None if bias is None else bias.float().contiguous()
        self.out, self.width = out, width

    @staticmethod
    def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of float32 `rows` (n x width, contiguous): Int8Head's quantisation, bit for bit."""
        n, width = rows.shape
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            raise ValueError("rows must be contiguous float32")
        codes, scales = torch.empty(n, width, dtype=torch.uint8), torch.empty(n)
        _build().library.tf_quantize_rows(rows.data_ptr(), n, width, codes.data_ptr(), scales.data_ptr())
        return codes, scales

    def __call__(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        n = codes.shape[0]
        if codes.shape != (n, self.width) or codes.dtype != torch.uint8 or scales.shape != (n,):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a head of {self.width} inputs")
        out = torch.empty(n, self.out)
        _build().library.tf_head(codes.data_ptr(), n, self.width, self.weight.data_ptr(), self.sums.data_ptr(),
                                 self.scales.data_ptr(), scales.data_ptr(), _pointer(self.bias), self.out,
                                 out.data_ptr())
        return out


def native_draw(logits: torch.Tensor, rows: list[int], tops: list[float], temperatures: list[float],
                uniform: torch.Tensor) -> list[int] | None:
    """Each of `rows` of float32 `logits` (contiguous, on the CPU) drawn at its temperature with its uniform number
    (tf_draw: exp((logit - top) / temperature), the inverse of its cumulative weight), overwriting those rows with
    their weights; None where the native library does not run (then the caller draws)."""
    library = _build().library
    if library is None or logits.dtype != torch.float32 or not logits.is_contiguous() or logits.device.type != "cpu":
        return None
    count = len(rows)
    if not all(0 <= row < len(logits) for row in rows) or not (len(tops) == len(temperatures) == count == len(uniform)):
        raise ValueError(f"rows {rows} of {len(logits)}, {len(tops)} tops, {len(temperatures)} temperatures, "
                         f"{len(uniform)} uniform numbers")
    out = torch.empty(count, dtype=torch.int64)
    floats = torch.tensor([tops, temperatures], dtype=torch.float32)
    uniform = uniform.to(torch.float32).contiguous()
    library.tf_draw(logits.data_ptr(), logits.shape[-1], count, (ctypes.c_int32 * count)(*rows), floats[0].data_ptr(),
                    floats[1].data_ptr(), uniform.data_ptr(), out.data_ptr())
    return out.tolist()
