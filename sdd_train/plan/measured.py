"""The peak the memory estimate is checked against: real training steps. On CPU, every allocation of
PyTorch's CPU allocator seen through the profiler (its running total, which includes what kernels
allocate and free inside themselves), plus the parameters and buffers that exist before it starts;
the run takes the GPU's paths in PyTorch ops (:func:`sdd_train.kernels.settings.set_cpu_paths`), as
the estimate does, so both count the same computation. On CUDA, the caching allocator's peak of
allocated bytes, with the GPU's own kernels.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sdd_train.config import RunConfig
from sdd_train.distributed.world import World
from sdd_train.kernels.settings import set_cpu_paths
from sdd_train.plan.memory import step_batch, storages_of, two_steps
from sdd_train.train.train_module import TrainModule


def _held(tensors) -> int:
    return sum({st._cdata: st.nbytes() for t in tensors for st in storages_of(t)}.values())


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
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        return before + max(totals, default=0)
    finally:
        set_cpu_paths(True)
