"""Training metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard when installed; MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

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


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where it came from): the datasheet bf16 peak of a known GPU, else a measured matmul rate."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{key} bf16 peak"
    return measured_matmul_flops(device, dtype), "measured matmul rate"


class MetricsLog:
    """Appends to metrics.jsonl (and TensorBoard); on resume, drops lines past the resumed step."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int = 0):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional; the JSONL file is the record
            return
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
