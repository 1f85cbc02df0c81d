"""Process-group set-up and the few collectives the training loop needs.

One code path for every launch: ``sdd-train`` is a world of one process (no process group, no
FSDP); ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and we join a process group
(NCCL on GPU, gloo on CPU). Helpers degrade to no-ops in a world of one. The world carries its
parallel dimensions (:class:`~sdd_train.distributed.dims.ParallelDims`), computed once when it starts.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sdd_train.config import ConfigError, ParallelConfig
from sdd_train.distributed.dims import ParallelDims
from sdd_train.distributed.host_memory import keep_freed_memory


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # How the ranks divide the work; left out (a world built by hand): plain FSDP2 over all of them.
    dims: ParallelDims = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.dims is None:
            object.__setattr__(self, "dims", ParallelDims.data_parallel(self.world_size))
        if self.dims.world_size != self.world_size:
            raise ValueError(f"{self.dims} does not span the world of {self.world_size} rank(s)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cpu_fsdp_supported() -> bool:
    """FSDP2 drives CPU tensors through the stream API, which CPU streams implement from torch 2.7."""
    return hasattr(torch.cpu.Stream, "record_event")


def init_world(device_name: str, par: ParallelConfig | None = None) -> World:
    """Join the process group that torchrun describes in the environment (if any) and pick a device.
    ``par`` (default: plain FSDP2) gives the world its parallel dimensions, checked before anything starts."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(par or ParallelConfig(), world_size)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        keep_freed_memory()  # eager CPU steps otherwise page-fault their activations in every step
    if world_size > 1 and not use_cuda and not cpu_fsdp_supported():
        raise ConfigError(f"FSDP2 on CPU (gloo) needs torch >= 2.7, this is {torch.__version__}: run one process"
                          " (without torchrun) or train on CUDA")
    if dims.ep > 1:
        from torch.distributed.fsdp import fully_shard

        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ConfigError(f"parallel.ep: expert parallelism needs FSDP2's ignored_params (torch >= 2.7), this is"
                              f" {torch.__version__}: set parallel.ep=1 or upgrade torch")
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=int(os.environ.get("SDD_TRAIN_DIST_TIMEOUT", "1800")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                                **({"device_id": device} if use_cuda else {}))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, dims=dims)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (a decision made once, e.g. which checkpoint to load)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a world of one)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
