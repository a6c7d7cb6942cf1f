"""Process-group setup and model wrapping for `torchrun`: DDP, or FSDP2 (`fully_shard`) for sharding.

One process without torchrun is world size 1 and wraps nothing. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import TableFreeError
from .runtime import Runtime

STRATEGIES = ("auto", "none", "ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device
    runtime: Runtime

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "auto", dtype: str = "auto") -> World:
    """The process group from torchrun's environment (or a world of one) and this rank's device and dtype."""
    from .runtime import resolve_runtime

    runtime = resolve_runtime(device, dtype)
    rank = runtime.rank
    if rank.world_size > 1 and not dist.is_initialized():
        cuda = runtime.device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=runtime.device if cuda else None)
    return World(rank.rank, rank.world_size, rank.local_rank, runtime.device, runtime)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, world: World, strategy: str) -> torch.nn.Module:
    """DDP or FSDP2 around `model` (already on its device); the training loop sees one interface."""
    if strategy not in STRATEGIES:
        raise TableFreeError(f"unknown distributed strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "ddp" if world.size > 1 else "none"
    if strategy == "none":
        if world.size > 1:
            raise TableFreeError("distributed=none under torchrun with several processes; use ddp or fsdp")
        return model
    if world.size == 1:
        raise TableFreeError(f"distributed={strategy} needs several processes under torchrun, and this is one; "
                             f"use distributed=auto or none")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # Shard each block, then the root (embeddings/head/final norm), as FSDP2 expects.
    for layer in model.gpt_neox.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def on_main(world: World, action: Callable[[], T]) -> T | None:
    """`action()` on rank 0 alone (its result there, None elsewhere); every rank waits for it.

    A TableFreeError on rank 0 is raised on every rank (the others name rank 0), so no rank is left
    waiting for one that stopped.
    """
    if world.size == 1:
        return action()
    result, failure = None, None
    if world.is_main:
        try:
            result = action()
        except TableFreeError as exc:
            failure = exc
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=world.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if failed.item():
        raise TableFreeError("rank 0 stopped with the error it printed")
    return result
