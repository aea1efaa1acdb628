"""Data parallelism through ``torch.distributed`` when launched by ``torchrun`` or
``accelerate launch`` (both set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``).

Each process rolls out its share of the groups, the per-turn distances of all processes are
gathered so the advantage is computed on the whole batch (batch-scope estimators need it), and
gradients are summed across processes after each micro-batch pass, the loss of every process
being divided by the global token count: the update is the gradient of one token mean over the
whole minibatch. A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) needs none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_grads", "all_reduce_sum", "barrier", "init_distributed"]


@dataclass(frozen=True)
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


def init_distributed() -> DistInfo:
    """Join the process group described by the launcher's environment variables, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(info: DistInfo, values: list[float], device) -> list[float]:
    if not info.enabled:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(info: DistInfo, params) -> None:
    """Sum gradients over processes (each process's loss is already divided by the global
    token count, so the sum is the gradient of the global token mean)."""
    if not info.enabled:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(p.dtype)
        offset += n


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
