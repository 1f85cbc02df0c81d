"""The peak the memory estimate is checked against: real training steps. On CPU, every allocation
the training thread makes through PyTorch's CPU allocator, seen through the profiler (their running
total, which includes what kernels allocate and free inside themselves), plus the parameters and
buffers that exist before it starts. What gloo's threads allocate is left out: their scratch buffers
are the collective library's own, as NCCL's are outside the CUDA caching allocator's count, and
whether they overlap the step's peak depends on thread timing;
the run takes the GPU's paths in PyTorch ops (:func:`sdd_train.kernels.settings.set_cpu_paths`), as
the estimate does, so both count the same computation. On CUDA, the caching allocator's peak of
allocated bytes, with the GPU's own kernels.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import torch

from sdd_train.config import RunConfig
from sdd_train.distributed.world import World
from sdd_train.kernels.settings import set_cpu_paths
from sdd_train.plan.memory import step_batch, storages_of, two_steps
from sdd_train.train.train_module import TrainModule


def _held(tensors) -> int:
    return sum({st._cdata: st.nbytes() for t in tensors for st in storages_of(t)}.values())


def _running_peak(events: list[dict], tid: int) -> int:
    """The highest of the CPU allocator's running total less what other threads than ``tid`` hold at
    that moment (gloo's scratch buffers: allocated and freed on its own threads)."""
    others: dict[int, int] = {}
    held_by_others = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        size, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if size > 0 and e.get("tid") != tid:
            others[addr] = size
            held_by_others += size
        elif size < 0 and addr in others:
            held_by_others -= others.pop(addr)
        peak = max(peak, e["args"]["Total Allocated"] - held_by_others)
    return peak


def measured_peak(cfg: RunConfig, world: World) -> int:
    """This rank's peak bytes over the estimate's two optimizer steps of ``cfg``, on random tokens."""
    t = cfg.train
    set_cpu_paths(False)
    try:
        module = TrainModule(cfg, world)
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len), device=world.device)
        batch, accum = step_batch(cfg, world.world_size, tokens)
        if world.device.type == "cuda":  # the caching allocator counts for itself
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(world.device)
            two_steps(module, batch, accum)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(world.device)
        before = _held([*module.model.parameters(), *module.model.buffers()])
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            two_steps(module, batch, accum)
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        return before + _running_peak(events, threading.get_native_id())
    finally:
        set_cpu_paths(True)
