"""Where and how a command runs: device, compute dtype, CPU threads and process rank, decided once.

Every entry point (train, eval, generate, serve, compare, quickstart, the benches) asks `resolve_runtime`
and prints `Runtime.describe()`, so the choice is made in one place and always said. `auto` means the
best present: CUDA with bfloat16 when a GPU is visible, else the CPU in float32 (bfloat16 on a CPU
with native bfloat16 products is a choice, measured in docs/architecture.md). The rank comes from
torchrun's environment here and nowhere else.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TableFreeError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: `--help` of the commands that add these flags stays light.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
DEVICE_HELP = "auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps"
DTYPE_HELP = "auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU features with bfloat16 matrix instructions, best first


@dataclass(frozen=True)
class ProcessRank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_rank() -> ProcessRank:
    """This process's place among torchrun's processes (a world of one without torchrun)."""
    try:
        return ProcessRank(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                           int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise TableFreeError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer; launch with torchrun or unset them") from None


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # the compute dtype: weights for inference, autocast for training
    rank: ProcessRank = ProcessRank()

    @property
    def is_main(self) -> bool:
        return self.rank.is_main

    def autocast(self):
        """Mixed precision for training: autocast to `dtype` off float32, a no-op in float32."""
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        import torch

        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        elif self.device.type == "cpu":
            where += f" ({torch.get_num_threads()} threads)"
        dtype = str(self.dtype).removeprefix("torch.")
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            feature = native_bf16()
            dtype += f" (native bf16: {feature})" if feature else f" (emulated: no {' or '.join(NATIVE_BF16_FLAGS)} on this CPU)"
        rank = f", rank {self.rank.rank} of {self.rank.world_size}" if self.rank.world_size > 1 else ""
        return f"{where}, {dtype}{rank}"


def cpu_info(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo ("model name", "flags", ...), or None (also off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in text.splitlines() if line.startswith(field)), None)


def native_bf16() -> str | None:
    """The CPU feature that gives this machine native bfloat16 matrix products, or None (also off Linux)."""
    flags = (cpu_info("flags") or "").split()
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    import torch

    if not DEVICE_PATTERN.fullmatch(name or ""):
        raise TableFreeError(f"unknown device {name!r}; choose {DEVICE_HELP}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TableFreeError(f"device {name}: no CUDA device is available; use cpu or auto")
        index = int(name[5:]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise TableFreeError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise TableFreeError("device mps: no Apple GPU is available; use cpu or auto")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        # A CPU with native bfloat16 still gets float32: bfloat16 trained only 1.3x faster here, below the 1.5x
        # that would pay for its rounding; `--dtype bfloat16` asks for it (docs/architecture.md).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise TableFreeError(f"unknown dtype {name!r}; choose {DTYPE_HELP}")
    if name == "float16" and device.type == "cpu":
        raise TableFreeError("dtype float16 is not supported on the CPU; use float32 or bfloat16")
    return getattr(torch, name)


def resolve_runtime(device: str = "auto", dtype: str = "auto", threads: int | None = None) -> Runtime:
    """The device, dtype and rank a command runs with; `threads` caps the CPU threads of this process."""
    import torch

    if threads is not None:
        if not 1 <= threads <= 1024:
            raise TableFreeError(f"threads must be between 1 and 1024, got {threads}")
        torch.set_num_threads(threads)
    rank = process_rank()
    chosen = pick_device(device, rank.local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return Runtime(chosen, pick_dtype(dtype, chosen), rank)


def in_passing_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) run in a thread of its own that ends when fn returns: its result, or its exception raised here.

    For setup work (loading a model) done before another long-lived thread runs the model. GNU OpenMP, torch's
    CPU thread pool, keeps a pool of workers for every thread that has run a parallel operator, until that thread
    ends; once its pools hold more threads than there are cores, every waiting worker sleeps almost at once instead
    of spinning, and each operator then waits for its workers to wake. A server whose main thread loaded the model
    and whose engine thread decodes has two pools: on this project's 2-core machine the engine's int8 small-affine
    made 212-221 tokens/s at 1 sequence and 1,781-1,855 at 32 so (its workers asleep between operators), and
    447-467 and 2,139-2,193 with the model loaded in a passing thread.
    """
    outcome = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # raised again in the caller's thread, traceback included
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="tablefree-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def settle_heap() -> int:
    """Puts every object alive now (the model's modules, the tokenizer's vocabulary, the libraries) out of the
    garbage collector's reach, after one full collection: for a process that is about to serve for a long time.
    Returns how many objects are set aside.

    Python's full collection walks every tracked object, and a server's heap after loading small-affine holds
    about 412,000: one full collection took 171 ms here, a pause of every stream at once, and the collector starts one
    by itself whenever enough objects have survived since the last. Set aside (`gc.freeze`), they are never walked
    again (0.0 ms); they live as long as the process anyway. Objects made later are collected as usual.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# The verbs whose work is long batched CPU compute (training and scoring), where waiting threads should sleep.
SLEEPING_THREAD_VERBS = ("train", "compare", "quickstart", "eval")


def prefer_sleeping_threads() -> None:
    """OpenMP threads that sleep rather than spin while they wait, unless OMP_WAIT_POLICY says otherwise.

    Must run before torch is imported. On a CPU shared with other work, a spinning thread holds a core another
    process needs: tiny-affine training on 2 cores ran at 1,243 tokens/s spinning and 1,567 sleeping beside one
    busy process, 541 and 1,530 beside two, and 2,955 and 2,669 on an idle machine. Serving keeps OpenMP's
    default: one stream decoded ~20% slower with sleeping threads on an idle machine.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_runtime_flags(parser) -> None:
    """--device and --dtype, with their help, for every command that runs a model."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)
