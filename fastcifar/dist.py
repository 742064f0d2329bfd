"""torch.distributed helpers: one process per GPU, launched by ``torchrun``.

``torchrun --nproc_per_node 8 -m fastcifar.cli train --model resnet_2111`` sets RANK, WORLD_SIZE,
LOCAL_RANK (and the rendezvous address); without them everything here degrades to a single
process and costs nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> DistInfo:
    """Join the process group described by the environment (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world_size)
    return info


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, info: DistInfo, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce (a no-op in a single process); returns ``t``."""
    if info.enabled:
        dist.all_reduce(t, op=op)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. a run folder name chosen from the clock)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@torch.no_grad()
def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters identical, but each rank updates its running statistics on its own
    shard after DDP's per-forward broadcast, so they drift apart; averaging them once an epoch,
    before evaluating or saving, makes every rank hold the same model (and a better estimate)."""
    if not info.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(info.world_size)
