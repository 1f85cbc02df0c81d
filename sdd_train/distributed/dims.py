"""How a run's ranks divide the work: the parallel dimensions, computed once from the config and the
world size (:func:`sdd_train.distributed.world.init_world` keeps them on the :class:`World`), and the
device mesh they make.

``dp_replicate`` groups (HSDP when more than one) of ``dp_shard`` ranks that shard the parameters
among them; with expert parallelism (``ep`` > 1) the ``dp_shard`` ranks of a group also split the
experts between them and send each token to its experts' rank. ``ep`` divides ``dp_shard``: a group's
ranks form ``dp_shard / ep`` EP groups of ``ep`` consecutive ranks, each EP group holds every expert
(``n_experts / ep`` a rank), and the ``expert_shard`` = ``dp_shard / ep`` ranks that hold the same
experts in different EP groups shard them between them, as FSDP2 shards the other parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdd_train.config import ConfigError, ParallelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int  # replica groups; > 1 is HSDP
    dp_shard: int  # ranks per group that shard the parameters
    world_size: int
    ep: int = 1  # expert parallelism over the dp_shard ranks: a divisor of dp_shard

    def __post_init__(self) -> None:
        if self.dp_replicate < 1 or self.dp_shard < 1 or self.dp_replicate * self.dp_shard != self.world_size:
            raise ValueError(f"{self}: dp_replicate x dp_shard must be the world size, each >= 1")
        if self.ep < 1 or self.dp_shard % self.ep:
            raise ValueError(f"{self}: ep must divide dp_shard")

    @property
    def expert_shard(self) -> int:
        """How many ranks of a shard group shard each expert (one in each EP group)."""
        return self.dp_shard // self.ep

    @classmethod
    def from_config(cls, par: ParallelConfig, world_size: int) -> ParallelDims:
        """``parallel.dp_replicate`` x ``parallel.dp_shard`` (-1: inferred) over ``world_size`` ranks; a
        shape that does not fit is a :class:`ConfigError` naming the key (exit 2)."""
        if par.dp_shard == -1:
            if world_size % par.dp_replicate:
                raise ConfigError(f"parallel.dp_replicate: {par.dp_replicate} replica groups do not divide the world"
                                  f" size {world_size} (parallel.dp_shard=-1 infers world_size / dp_replicate)")
            dp_shard = world_size // par.dp_replicate
        elif par.dp_replicate * par.dp_shard != world_size:
            raise ConfigError(
                f"parallel.dp_shard: dp_replicate={par.dp_replicate} x dp_shard={par.dp_shard} must equal the world"
                f" size {world_size} (set dp_shard=-1 to infer it)"
            )
        else:
            dp_shard = par.dp_shard
        if dp_shard % par.ep:
            raise ConfigError(f"parallel.ep: {par.ep} does not divide the {dp_shard} ranks of a shard group"
                              f" (world size {world_size} / dp_replicate {par.dp_replicate}): EP groups of ep"
                              f" consecutive ranks split the experts; choose an ep that divides {dp_shard}")
        return cls(par.dp_replicate, dp_shard, world_size, par.ep)

    @classmethod
    def data_parallel(cls, world_size: int) -> ParallelDims:
        """Plain FSDP2 over every rank (the config's defaults)."""
        return cls(1, world_size, world_size)

    @property
    def sharded(self) -> bool:
        """More than one rank: the model is sharded (FSDP2 or HSDP)."""
        return self.world_size > 1

    def mesh_dims(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of the mesh's dimensions, outermost first: ``dp_shard`` alone (FSDP2), or
        ``dp_replicate`` then ``dp_shard`` (HSDP)."""
        dims = (("dp_replicate", self.dp_replicate),) if self.dp_replicate > 1 else ()
        return (*dims, ("dp_shard", self.dp_shard))

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The device mesh over every rank, with the dimensions of :meth:`mesh_dims` (needs the process group)."""
        from torch.distributed.device_mesh import init_device_mesh

        names, sizes = zip(*self.mesh_dims())
        return init_device_mesh(device_type, sizes, mesh_dim_names=names)

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The experts' mesh over every rank: ``dp_replicate`` (when > 1), ``expert_shard`` and ``ep``,
        outermost first, so that an EP group is ``ep`` consecutive ranks of a shard group."""
        from torch.distributed.device_mesh import init_device_mesh

        dims = (("dp_replicate", self.dp_replicate),) if self.dp_replicate > 1 else ()
        names, sizes = zip(*dims, ("expert_shard", self.expert_shard), ("ep", self.ep))
        return init_device_mesh(device_type, sizes, mesh_dim_names=names)

    def describe(self) -> str:
        """As printed at start-up: ``FSDP2 over 2 ranks``, ``HSDP over 4 ranks (2 replicas x 2 shards)``."""
        if not self.sharded:
            return "one process"
        ep = f", experts split over {self.ep} ranks" if self.ep > 1 else ""
        if self.ep > 1 and self.expert_shard > 1:
            ep += f" and sharded over {self.expert_shard}"
        if self.dp_replicate > 1:
            return f"HSDP over {self.world_size} ranks ({self.dp_replicate} replicas x {self.dp_shard} shards{ep})"
        return f"FSDP2 over {self.world_size} ranks{ep}"
