"""This rank's micro-batches of each global batch of the training stream, read ahead in a thread.

The trainer owns the stream position (training instances consumed) and the positions a rollback
excluded; the feed turns a position into this rank's slice of that global batch, on the device,
and while the first micro-batch computes it schedules the next step's. A document mask whose form
depends on the batch's documents (flash-attn's spans, FlexAttention's block mask) is built here from
the host's ids, so that its shape is known without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from sdd_train.config import RunConfig
from sdd_train.data.loader import MixtureLoader, Prefetcher
from sdd_train.distributed.world import World
from sdd_train.kernels.attention import prebuilt_document_mask
from sdd_train.kernels.precision import DTYPES


class DataFeed:
    def __init__(self, loader: MixtureLoader, cfg: RunConfig, world: World, prefetch: bool):
        t = cfg.train
        self.loader, self.device = loader, world.device
        self.backend = cfg.model.attention_backend
        self.dtype = DTYPES[t.precision]  # what q, k, v compute in
        self.global_batch, self.micro_batch = t.global_batch_size, t.micro_batch_size
        per_rank = t.global_batch_size // world.world_size
        self.accum = per_rank // t.micro_batch_size  # micro-batches per rank and step
        self.starts = [world.rank * per_rank + i * t.micro_batch_size for i in range(self.accum)]
        self.prefetch = Prefetcher(loader.batch, pin_memory=world.device.type == "cuda") if prefetch else None

    def next_position(self, position: int, excluded: Collection[int]) -> int:
        """The first stream position at or after ``position`` whose batch a rollback did not exclude."""
        while position in excluded:
            position += self.global_batch
        return position

    def micro_batches(self, position: int, excluded: Collection[int]) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches of the global batch at ``position``, on the device, and under
        ``attention_mask`` the document mask of its ``doc_ids`` where that is spans or a block mask."""
        for micro, start in enumerate(self.starts):
            if self.prefetch is None:
                batch = self.loader.batch(position, start, self.micro_batch)
            else:
                batch = self.prefetch.get(position, start, self.micro_batch)
                if micro == 0:  # read the next step's micro-batches while this one computes
                    following = self.next_position(position + self.global_batch, excluded)
                    for s in self.starts:
                        self.prefetch.schedule(following, s, self.micro_batch)
            on_device: dict[str, Any] = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if "doc_ids" in batch:
                mask = prebuilt_document_mask(batch["doc_ids"], on_device["doc_ids"], self.backend, self.dtype)
                if mask is not None:
                    on_device["attention_mask"] = mask
            yield on_device

    def clear(self) -> None:
        """Forget batches read ahead (after a rollback or a resume the loop asks for other positions)."""
        if self.prefetch is not None:
            self.prefetch.clear()

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
