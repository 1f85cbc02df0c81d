"""Will a run fit? Per-rank peak memory of a training step, from the config alone, on a laptop.

The run's own train module is built for ``world_size`` ranks on one process: a fake process group
stands in for the other ranks (FSDP2 shards and gathers as it would, its collectives move nothing),
and the model, its optimizer and two optimizer steps run on fake tensors (shapes and dtypes, no
storage, no arithmetic). A dispatch mode watches every storage the step's tensors live in; the
largest total over the steps is the peak, split at that moment into parameters (this rank's shards
and buffers), gradients, optimizer state, and everything else: activations saved for backward,
their gradients, temporaries, gathered parameters and collective buffers.

What it does not see, and the reader adds: the CUDA context and the caching allocator's rounding
and fragmentation (the ``reserve`` of :func:`fits`), and what torch.compile changes (the estimate
runs eager; inductor's fused kernels usually save less). Kernels take their PyTorch paths, which
save for backward what the GPU kernels save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from sdd_train.config import ConfigError, RunConfig
from sdd_train.distributed.dims import ParallelDims
from sdd_train.distributed.world import World, cpu_fsdp_supported
from sdd_train.exit_codes import UsageError
from sdd_train.model import check_model_config
from sdd_train.train.train_module import TrainModule

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at the step's peak, by what holds them."""

    world_size: int
    micro_batch_size: int
    micro_batches: int  # per rank and step, as the config's batch sizes make them
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int  # and temporaries, gathered parameters, collective buffers

    @property
    def peak(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations and temporaries", self.activations),
                ("peak", self.peak)]


def storages_of(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages ``t`` lives in (a DTensor's: its local shard's)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from storages_of(inner)
    else:
        yield t.untyped_storage()


class LiveStorages(TorchDispatchMode):
    """The bytes of every storage an op's output lives in, weakly held: a storage counts until it is
    freed, and at its current size (FSDP2 frees its gathered parameters by resizing their storage to
    nothing, which the mode sees by wrapping ``UntypedStorage.resize_``). At each new peak the total
    is split: parameters are the storages the module held as the step began (FSDP2's shards, the
    buffers), gradients those the parameters and FSDP2 hold right then, optimizer state the
    optimizer's; the rest are activations, temporaries, gathered parameters and collective buffers."""

    def __init__(self, module: TrainModule) -> None:
        super().__init__()
        self.module = module
        self.sizes: dict[int, int] = {}  # storage key -> bytes
        self.refs: dict[int, weakref.ref] = {}
        self.total = self.peak = 0
        self.split: dict[str, int] = {}
        state = [*module.model.parameters(), *module.model.buffers()]  # as the step starts: FSDP2's shards
        for t in state:
            self.watch(t)
        self.state_keys = {st._cdata for t in state for st in storages_of(t)}

    def watch(self, t: torch.Tensor) -> None:
        for st in storages_of(t):
            self._resized(st)

    def _resized(self, st: torch.UntypedStorage) -> None:
        key, size = st._cdata, st.nbytes()
        if key not in self.refs:
            self.refs[key] = weakref.ref(st, lambda _, key=key: self._freed(key))
        self.total += size - self.sizes.get(key, 0)
        self.sizes[key] = size

    def _freed(self, key: int) -> None:
        self.refs.pop(key, None)
        self.total -= self.sizes.pop(key, 0)

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def tracked_resize(st: torch.UntypedStorage, size: int):
            out = resize(st, size)
            if st._cdata in self.refs:
                self._resized(st)
                self.measure()
            return out

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.watch(t)
        self.measure()
        return out

    def measure(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.split = self._split(self.sizes)

    def _split(self, sizes: dict[int, int]) -> dict[str, int]:
        def held(tensors) -> int:
            keys = {st._cdata for t in tensors if isinstance(t, torch.Tensor) for st in storages_of(t)}
            return sum(sizes.get(k, 0) for k in keys)

        model, optimizer = self.module.model, self.module.optimizer  # its parameters now: gathered ones too
        split = {"parameters": sum(sizes.get(k, 0) for k in self.state_keys),
                 "gradients": held([*(p.grad for p in model.parameters()), *fsdp_gradients(model)]),
                 "optimizer_state": held(tree_leaves(list(optimizer.state.values())))}
        split["activations"] = sum(sizes.values()) - sum(split.values())
        return split


def fsdp_gradients(model: torch.nn.Module) -> Iterator[torch.Tensor | None]:
    """The gradients FSDP2 holds where ``parameters()`` does not show them: those of the gathered
    parameters, and those accumulated unsharded over micro-batches (``parallel.defer_grad_sync``)."""
    for module in model.modules():
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None) if hasattr(module, "_get_fsdp_state") \
            else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            yield getattr(fsdp_param, "unsharded_accumulated_grad", None)
            yield getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)


@contextlib.contextmanager
def fake_world(cfg: RunConfig, world_size: int) -> Iterator[World]:
    """A world of ``world_size`` ranks seen from rank 0, on this process: a fake process group (every
    collective returns at once) and the config's parallel dimensions."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if world_size > 1:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield World(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"), dims=dims)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def step_batch(cfg: RunConfig, world_size: int, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The micro-batch both the estimate and its measurement train on (``tokens`` [micro-batch, seq])
    and how many of them a step runs: the rank's micro-batches, at most two (the second sees the first's
    gradients, as every later one would)."""
    batch = {"inputs": tokens, "targets": tokens}
    if cfg.data.doc_mask:
        batch["doc_ids"] = torch.zeros_like(tokens)
    return batch, min(micro_batches(cfg, world_size, tokens.shape[0]), 2)


def micro_batches(cfg: RunConfig, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches per rank and optimizer step (at least one)."""
    return max(cfg.train.global_batch_size // (world_size * micro_batch_size), 1)


def two_steps(module: TrainModule, batch: dict[str, torch.Tensor], accum: int) -> None:
    """Two optimizer steps of ``accum`` copies of ``batch``: the second holds the optimizer state the
    first created."""
    for step in (1, 2):
        out = module.train_batch([batch] * accum, accum, step)
        module.clip_gradients(out)
        module.optim_step(out)
        module.zero_grad()


def estimate_memory(cfg: RunConfig, world_size: int, micro_batch_size: int | None = None) -> MemoryEstimate:
    """Rank 0's peak over two optimizer steps of ``cfg`` on ``world_size`` ranks (``micro_batch_size``
    replaces the config's), as :func:`two_steps` runs them."""
    t = cfg.train
    mb = micro_batch_size or t.micro_batch_size
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=mb, compile=False))
    check_model_config(cfg.model)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_world(cfg, world_size) as world:
        module = TrainModule(cfg, world, fake)
        with fake:
            batch, accum = step_batch(cfg, world_size, torch.zeros(mb, t.seq_len, dtype=torch.long))
            tracker = LiveStorages(module)
            with tracker:
                two_steps(module, batch, accum)
    return MemoryEstimate(world_size, mb, micro_batches(cfg, world_size, mb), **tracker.split)


def largest_micro_batch(cfg: RunConfig, world_size: int, budget: int, known: MemoryEstimate | None = None
                        ) -> tuple[int, MemoryEstimate | None]:
    """The largest micro-batch whose estimated peak is at most ``budget`` bytes (0 and None: not even
    one sequence), with its estimate (``known``: one already made, not made again). The peak grows
    about linearly with the micro-batch: each guess follows the line through the last two estimates,
    within the bounds found so far, until the largest size that fits sits next to the smallest that
    does not."""
    made = {known.micro_batch_size: known} if known is not None else {}

    def estimate(mb: int) -> MemoryEstimate:
        if mb not in made:
            made[mb] = estimate_memory(cfg, world_size, mb)
        return made[mb]

    fits: MemoryEstimate = estimate(1)
    if fits.peak > budget:
        return 0, None
    too_big: MemoryEstimate | None = None
    previous, current = fits, estimate(2)
    while True:
        if current.peak <= budget:
            fits = max(fits, current, key=lambda e: e.micro_batch_size)
        else:
            too_big = min(too_big or current, current, key=lambda e: e.micro_batch_size)
        if too_big is not None and too_big.micro_batch_size == fits.micro_batch_size + 1:
            return fits.micro_batch_size, fits
        slope = max((current.peak - previous.peak) / (current.micro_batch_size - previous.micro_batch_size), 1.0)
        guess = current.micro_batch_size + math.floor((budget - current.peak) / slope)
        low = fits.micro_batch_size + 1
        if too_big is not None:
            high = too_big.micro_batch_size - 1
            if not low <= guess <= high:  # the line points outside the bounds: halve them instead
                guess = (low + high) // 2
        elif guess < low:
            guess = 2 * fits.micro_batch_size
        previous, current = current, estimate(guess)


def check_estimate_args(cfg: RunConfig, world_size: int) -> ParallelDims:
    """The config fits ``world_size`` ranks (its parallel dimensions; FSDP2 on CPU for more than one)."""
    if world_size < 1:
        raise ConfigError(f"--world-size: {world_size} must be at least 1")
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if world_size > 1 and not cpu_fsdp_supported():
        raise ConfigError(f"--world-size: estimating {world_size} ranks runs FSDP2 on CPU, which needs torch >= 2.7"
                          f" (this is {torch.__version__}); estimate --world-size 1 or upgrade torch")
    return dims


def planning_report(cfg: RunConfig, world_size: int, memory: bool, step_device: str | None,
                    device_gib: float | None = None, reserve_gib: float = 2.0) -> str:
    """What ``sdd-train CONFIG --estimate-memory`` and/or ``--estimate-step DEVICE`` print, from one
    memory estimate."""
    dims = check_estimate_args(cfg, world_size)
    if reserve_gib < 0 or (device_gib is not None and device_gib <= reserve_gib):
        raise UsageError(f"--device-memory-gib {device_gib:g} must be more than --reserve-gib {reserve_gib:g}"
                         " (>= 0, kept for the CUDA context and the allocator)")
    e = estimate_memory(cfg, world_size)
    parts = [memory_report(cfg, dims, e, device_gib, reserve_gib)] if memory else []
    if step_device is not None:
        parts.append(step_report(cfg, world_size, step_device, e))
    return "\n".join(parts)


def memory_report(cfg: RunConfig, dims: ParallelDims, e: MemoryEstimate, device_gib: float | None = None,
                  reserve_gib: float = 2.0) -> str:
    """The split of the peak ``e`` and, given the device's memory, whether the run fits and the largest
    micro-batch that does."""
    t, par = cfg.train, cfg.parallel
    ac = par.activation_checkpointing
    ac += f" (every {par.ac_every})" if ac == "every_n" else ""
    lines = [f"memory estimate for rank 0 of {dims.describe()}: micro-batch {e.micro_batch_size} x {t.seq_len} tokens"
             f" ({e.micro_batches} per rank and step), {t.precision}, parameters gathered in {par.param_dtype},"
             f" activation checkpointing {ac}; eager, tensors only",
             *(f"  {name:<30}{size / GIB:9.2f} GiB" for name, size in e.rows())]
    if device_gib is not None:
        budget = int((device_gib - reserve_gib) * GIB)
        verdict = "fits" if e.peak <= budget else "does NOT fit"
        lines.append(f"{verdict} in {device_gib:g} GiB less {reserve_gib:g} GiB reserved (CUDA context, allocator)")
        largest, at = largest_micro_batch(cfg, dims.world_size, budget, known=e)
        if at is None:
            lines.append("  not even train.micro_batch_size=1 fits: shard over more ranks, or set"
                         " parallel.activation_checkpointing=full")
        else:
            lines.append(f"  largest train.micro_batch_size that fits: {largest} (peak {at.peak / GIB:.2f} GiB)")
    return "\n".join(lines)


def step_report(cfg: RunConfig, world_size: int, device_name: str, e: MemoryEstimate) -> str:
    """The throughput model's terms on ``device_name``, with the activation traffic taken from the
    memory estimate ``e``."""
    from sdd_train.plan.throughput import DEVICES, estimate_step, measure_cpu

    device = measure_cpu(cfg.train.precision) if device_name == "cpu" else DEVICES[device_name]
    step = estimate_step(cfg, world_size, device, e.activations)
    between = f", {device.interconnect_gb_s:g} GB/s between ranks" if world_size > 1 else ""
    return (f"step estimate on {world_size} x {device.name} ({device.peak_tflops:g} TFLOP/s at"
            f" {device.matmul_efficiency:.0%}, {device.memory_gb_s:,.0f} GB/s memory{between}):\n{step.describe()}")
