"""Where a training process stands among its peers: rank, world size, device, collectives.

One process trains alone; under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) every process joins one process group: NCCL
when the processes train on GPUs, gloo on CPUs. Multi-node runs are the same with more ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vsotools.core.errors import VsoError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise VsoError("train.device is cuda but no CUDA device is available (set device=cpu)")
    if local_rank >= torch.cuda.device_count():
        raise VsoError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s):"
            " start no more processes per node than GPUs"
        )
    return torch.device("cuda", local_rank)


def setup(device_preference: str) -> Context:
    """Join the process group when started by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        # Rank 0 alone builds the vocabulary and word vectors while the others wait for them.
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(hours=1),
            **options,
        )
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def all_sum(context: Context, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(context: Context, flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a boolean tensor on this rank's device) is true on some rank; every
    rank gets the same answer."""
    value = flag.to(torch.int64).reshape(())
    if context.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def min_over_ranks(context: Context, value: int) -> int:
    """The smallest of every rank's ``value``; every rank gets the same answer."""
    if not context.distributed:
        return value
    tensor = torch.tensor(value, dtype=torch.int64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def gather_objects(context: Context, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects)."""
    if not context.distributed:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(context: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(context: Context, module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank."""
    if not context.distributed:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def wrap(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when there are several ranks (build it again
    whenever the set of trainable parameters changes)."""
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``wrap``'s DistributedDataParallel (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
