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
from sdd_train.distributed.world import World
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


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages ``t`` lives in (a DTensor's: its local shard's)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
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
        self.state_keys = {st._cdata for t in state for st in _storages(t)}

    def watch(self, t: torch.Tensor) -> None:
        for st in _storages(t):
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
            keys = {st._cdata for t in tensors if isinstance(t, torch.Tensor) for st in _storages(t)}
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


def estimate_memory(cfg: RunConfig, world_size: int, micro_batch_size: int | None = None) -> MemoryEstimate:
    """Rank 0's peak over two optimizer steps of ``cfg`` on ``world_size`` ranks (``micro_batch_size``
    replaces the config's). Each step runs up to two of the rank's micro-batches: the second sees the
    first's gradients, as every later one would."""
    t = cfg.train
    mb = micro_batch_size or t.micro_batch_size
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=mb, compile=False))
    check_model_config(cfg.model)
    accum = max(t.global_batch_size // (world_size * mb), 1)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_world(cfg, world_size) as world:
        module = TrainModule(cfg, world, fake)
        with fake:
            tokens = torch.zeros(mb, t.seq_len, dtype=torch.long)
            batch = {"inputs": tokens, "targets": tokens}
            if cfg.data.doc_mask:
                batch["doc_ids"] = tokens
            tracker = LiveStorages(module)
            with tracker:
                for step in (1, 2):
                    out = module.train_batch([batch] * min(accum, 2), min(accum, 2), step)
                    module.clip_gradients(out)
                    module.optim_step(out)
                    module.zero_grad()
    return MemoryEstimate(world_size, mb, accum, **tracker.split)


def largest_micro_batch(cfg: RunConfig, world_size: int, budget: int) -> tuple[int, MemoryEstimate | None]:
    """The largest micro-batch whose estimated peak is at most ``budget`` bytes (0 and None: not even
    one sequence), with its estimate. The peak grows about linearly with the micro-batch: each guess
    follows the line through the last two estimates, within the bounds found so far, until the
    largest size that fits sits next to the smallest that does not."""
    fits: MemoryEstimate = estimate_memory(cfg, world_size, 1)
    if fits.peak > budget:
        return 0, None
    too_big: MemoryEstimate | None = None
    previous, current = fits, estimate_memory(cfg, world_size, 2)
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
        previous, current = current, estimate_memory(cfg, world_size, guess)


def check_estimate_args(cfg: RunConfig, world_size: int) -> None:
    """The config fits ``world_size`` ranks (its parallel dimensions; FSDP2 on CPU for more than one)."""
    from sdd_train.distributed.world import cpu_fsdp_supported

    if world_size < 1:
        raise ConfigError(f"--world-size: {world_size} must be at least 1")
    ParallelDims.from_config(cfg.parallel, world_size)
    if world_size > 1 and not cpu_fsdp_supported():
        raise ConfigError(f"--world-size: estimating {world_size} ranks runs FSDP2 on CPU, which needs torch >= 2.7"
                          f" (this is {torch.__version__}); estimate --world-size 1 or upgrade torch")


def memory_report(cfg: RunConfig, world_size: int, device_gib: float | None = None, reserve_gib: float = 2.0) -> str:
    """What ``sdd-train CONFIG --estimate-memory`` prints: the split at the peak and, given the device's
    memory, whether the run fits and the largest micro-batch that does."""
    check_estimate_args(cfg, world_size)
    t, par = cfg.train, cfg.parallel
    e = estimate_memory(cfg, world_size)
    dims = ParallelDims.from_config(par, world_size)
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
        largest, at = largest_micro_batch(cfg, world_size, budget)
        if at is None:
            lines.append("  not even train.micro_batch_size=1 fits: shard over more ranks, or set"
                         " parallel.activation_checkpointing=full")
        else:
            lines.append(f"  largest train.micro_batch_size that fits: {largest} (peak {at.peak / GIB:.2f} GiB)")
    return "\n".join(lines)


def step_report(cfg: RunConfig, world_size: int, device_name: str) -> str:
    """What ``sdd-train CONFIG --estimate-step DEVICE`` prints: the throughput model's terms, with the
    activation traffic taken from the memory estimate."""
    from sdd_train.plan.throughput import DEVICES, estimate_step, measure_cpu

    check_estimate_args(cfg, world_size)
    device = measure_cpu(cfg.train.precision) if device_name == "cpu" else DEVICES[device_name]
    activations = estimate_memory(cfg, world_size).activations
    step = estimate_step(cfg, world_size, device, activations)
    between = f", {device.interconnect_gb_s:g} GB/s between ranks" if world_size > 1 else ""
    return (f"step estimate on {world_size} x {device.name} ({device.peak_tflops:g} TFLOP/s at"
            f" {device.matmul_efficiency:.0%}, {device.memory_gb_s:,.0f} GB/s memory{between}):\n{step.describe()}")
