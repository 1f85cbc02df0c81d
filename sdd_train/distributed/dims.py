"""How a run's ranks divide the work: the parallel dimensions, computed once from the config and the
world size (:func:`sdd_train.distributed.world.init_world` keeps them on the :class:`World`), and the
device mesh they make.

``dp_replicate`` groups (HSDP when more than one) of ``dp_shard`` ranks that shard the parameters
among them; with expert parallelism (``ep`` > 1) the ``dp_shard`` ranks of a group also split the
experts between them, whole, and send each token to its experts' rank. ``ep`` uses the ``dp_shard``
dimension of the mesh (FSDP2 would shard the stacked experts along the same ranks, whole experts per
rank): ``ep`` smaller than ``dp_shard`` (experts FSDP-sharded across EP groups) is not built.
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
    ep: int = 1  # expert parallelism over the dp_shard ranks: 1 or dp_shard

    def __post_init__(self) -> None:
        if self.dp_replicate < 1 or self.dp_shard < 1 or self.dp_replicate * self.dp_shard != self.world_size:
            raise ValueError(f"{self}: dp_replicate x dp_shard must be the world size, each >= 1")
        if self.ep not in (1, self.dp_shard):
            raise ValueError(f"{self}: ep must be 1 or dp_shard")

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
        if par.ep not in (1, dp_shard):
            raise ConfigError(f"parallel.ep: {par.ep} must be 1 or the {dp_shard} ranks of a shard group"
                              f" (world size {world_size} / dp_replicate {par.dp_replicate}): experts are split over"
                              f" those ranks; set parallel.ep={dp_shard} or run {par.ep * par.dp_replicate} ranks")
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

    def describe(self) -> str:
        """As printed at start-up: ``FSDP2 over 2 ranks``, ``HSDP over 4 ranks (2 replicas x 2 shards)``."""
        if not self.sharded:
            return "one process"
        ep = f", experts split over {self.ep} ranks" if self.ep > 1 else ""
        if self.dp_replicate > 1:
            return f"HSDP over {self.world_size} ranks ({self.dp_replicate} replicas x {self.dp_shard} shards{ep})"
        return f"FSDP2 over {self.world_size} ranks{ep}"
