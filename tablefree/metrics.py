"""Training metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard when installed; MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import TableFreeError
from .files import append_text, json_text, refuse_symlink, write_atomic

# Dense bf16 peak of common accelerators (FLOP/s), for MFU; anything else: pass peak_flops explicitly.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def training_flops_per_token(config, seq_len: int) -> float:
    """6 x (matmul parameters) + attention, per token of forward + backward (the PaLM appendix count)."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * d * d + 2 * d * config.intermediate_size  # qkv + out, MLP in + out
    matmul_params = layers * per_layer + d * vocab  # output head; the input lookup is not a matmul
    return 6 * matmul_params + 12 * layers * d * seq_len


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a square matmul on this device: the reference MFU is measured against on CPU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (thread pools, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


MEASURED_PEAK = "measured matmul rate"


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where it came from): the datasheet bf16 peak of a known GPU, else a measured matmul rate."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{key} bf16 peak"
    return measured_matmul_flops(device, dtype), MEASURED_PEAK


class MetricsLog:
    """Appends to metrics.jsonl (and TensorBoard); on resume, drops lines past the resumed step.

    Each line is one strict-JSON object, appended whole; a kill mid-append can only tear the last line,
    which the next run drops (it belongs to a step past the checkpoint anyway). The trainer logs every
    row of a step before that step's checkpoint, so the rows kept on resume are never logged again.
    Neither file nor the TensorBoard directory is written through a symlink.
    """

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if refuse_symlink(self.path).exists():
            kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
            write_atomic(self.path, "".join(_line(row) for row in kept).encode("utf-8"))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional; the JSONL file is the record
            return
        self.writer = SummaryWriter(str(refuse_symlink(out_dir / "tensorboard")), purge_step=resume_step + 1)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        append_text(self.path, _line({"step": step, **values}))
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _line(row: dict) -> str:
    return json_text(row, indent=None) + "\n"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a kill mid-append) is dropped.

    A damaged line before the last is an error rather than skipped: appends cannot cause it, and
    rewriting the file on resume would lose that line for good.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise TableFreeError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer step")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not any(rest.strip() for rest in lines[number:]):
                break  # the torn tail of an interrupted append
            raise TableFreeError(
                f"line {number} of {path} is damaged ({exc}); fix or delete that line, then run again"
            ) from None
        rows.append(row)
    return rows
