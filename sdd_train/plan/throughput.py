"""How long will a step take? A first-order model of one training step from the config and a device
description, with its terms shown, for planning before a run (``sdd-train CONFIG --estimate-step``).

Terms, per rank and optimizer step:

- **compute**: the model's training FLOPs (6 x active parameters + the head + attention, the MFU
  numerator) for the rank's tokens, plus what activation checkpointing recomputes (one more forward,
  2 of the 6, for every checkpointed block; selective keeps the matrix products and recomputes
  almost none of the FLOPs), at ``matmul_efficiency`` x the device's peak;
- **memory traffic**: the elementwise work (norms, SwiGLU, RoPE, softmax, the optimizer) is bound by
  memory bandwidth; it is taken as ``traffic_passes`` reads or writes of the activations the memory
  estimate counts, plus the optimizer's pass over parameters, gradients and state (16 bytes a
  parameter in and out for AdamW), at the device's memory bandwidth;
- **communication** (more than one rank): FSDP2 all-gathers the parameters in ``param_dtype`` for
  the forward and again for the backward (when blocks reshard after forward), and reduce-scatters
  fp32 gradients once a step (once per micro-batch without ``defer_grad_sync``); a rank sends and
  receives (N-1)/N of each volume over the interconnect. It overlaps with compute, block by block:
  what is exposed is the first block's gather, plus whatever exceeds the compute.

Assumptions, stated because they decide the answer: a matmul efficiency (default 0.6 of peak on
GPUs, what a tuned bf16 transformer reaches), no kernel launch overhead, no data-loading stall, and
an interconnect that gives every rank its bandwidth at once (a ring on NVLink within a node; across
nodes, set ``interconnect_gb_s`` to the per-GPU network bandwidth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdd_train.config import RunConfig
from sdd_train.model import Transformer
from sdd_train.train.callbacks.speed import PEAK_TFLOPS


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense bf16 (fp32 on a CPU measured in fp32)
    memory_gb_s: float
    interconnect_gb_s: float  # per rank, each direction
    matmul_efficiency: float = 0.6


# Vendor figures: SXM parts, NVLink 4 (H100/H200) and 3 (A100) per-GPU bandwidth in one direction.
DEVICES = {
    "h100": Device("H100 SXM", PEAK_TFLOPS["H100"], 3350.0, 450.0),
    "h200": Device("H200 SXM", PEAK_TFLOPS["H200"], 4800.0, 450.0),
    "a100": Device("A100 SXM 80GB", PEAK_TFLOPS["A100"], 2039.0, 300.0),
}


@dataclass(frozen=True)
class StepEstimate:
    tokens_per_rank: int
    model_flops: float  # per rank and step, without recomputation (the MFU numerator)
    compute_s: float
    memory_s: float
    gather_bytes: float  # per rank and step, sent and received
    reduce_bytes: float
    comm_s: float
    exposed_comm_s: float
    peak_tflops: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.memory_s + self.exposed_comm_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_s * self.peak_tflops * 1e12)

    def describe(self) -> str:
        gib = 2**30
        return "\n".join([
            f"  compute            {self.compute_s * 1e3:10.1f} ms  ({self.model_flops / 1e12:.2f} TFLOP of model"
            f" work for {self.tokens_per_rank:,} tokens, plus recomputation)",
            f"  memory traffic     {self.memory_s * 1e3:10.1f} ms  (elementwise work and the optimizer)",
            f"  communication      {self.comm_s * 1e3:10.1f} ms  (all-gather {self.gather_bytes / gib:.2f} GiB,"
            f" reduce-scatter {self.reduce_bytes / gib:.2f} GiB), {self.exposed_comm_s * 1e3:.1f} ms exposed",
            f"  step               {self.step_s * 1e3:10.1f} ms   MFU {self.mfu:.1%}",
        ])


def recompute_fraction(cfg: RunConfig) -> float:
    """Extra FLOPs of activation checkpointing, as a fraction of the model's 6-per-parameter work:
    the checkpointed blocks' forward (2 of 6) again."""
    par = cfg.parallel
    blocks = cfg.model.n_layers
    checkpointed = {"none": 0, "selective": 0, "full": blocks,
                    "every_n": math.ceil(blocks / max(par.ac_every, 1))}[par.activation_checkpointing]
    return (2 / 6) * checkpointed / blocks


def estimate_step(cfg: RunConfig, world_size: int, device: Device, activation_bytes: int) -> StepEstimate:
    """One optimizer step of ``cfg`` on each of ``world_size`` ranks of ``device``; ``activation_bytes``
    is the memory estimate's activations at its peak (one micro-batch's worth of saved tensors)."""
    import torch

    t, par = cfg.train, cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    tokens = t.global_batch_size * t.seq_len // world_size
    micro_batches = max(t.global_batch_size // (world_size * t.micro_batch_size), 1)
    model_flops = model.flops_per_token(t.seq_len) * tokens
    peak = device.peak_tflops * 1e12
    compute = model_flops * (1 + recompute_fraction(cfg)) / (peak * device.matmul_efficiency)
    traffic_passes = 4  # the saved activations written, read in backward, and their gradients both ways
    optimizer_bytes = 2 * 16 * params / world_size
    memory = (traffic_passes * activation_bytes * micro_batches + optimizer_bytes) / (device.memory_gb_s * 1e9)
    gather = reduce = comm = exposed = 0.0
    if world_size > 1:
        share = (world_size - 1) / world_size
        param_bytes = {"fp32": 4, "bf16": 2}[par.param_dtype]
        gathers = 2 if par.reshard_after_forward else 1
        reduces = 1 if par.defer_grad_sync else micro_batches
        gather = share * params * param_bytes * gathers * micro_batches
        reduce = share * params * 4 * reduces
        comm = (gather + reduce) / (device.interconnect_gb_s * 1e9)
        first_block = comm / max(cfg.model.n_layers, 1)
        exposed = first_block + max(0.0, comm - first_block - compute)
    return StepEstimate(tokens, model_flops, compute, memory, gather, reduce, comm, exposed, device.peak_tflops)


def measure_cpu(dtype_name: str = "fp32") -> Device:
    """This machine's CPU as a device: the FLOP/s of a large matmul in ``dtype_name`` (taken as what
    the model's matmuls reach, efficiency 1) and the bandwidth of a large copy."""
    import torch
    from torch.utils.benchmark import Timer

    from sdd_train.kernels.precision import DTYPES

    dtype = DTYPES[dtype_name]
    a = torch.randn(1024, 1024, dtype=dtype)
    src = torch.empty(64 * 2**20 // 4)
    dst = torch.empty_like(src)

    def seconds(fn) -> float:  # the median of timed blocks
        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=0.5).median

    flops = 2 * 1024**3 / seconds(lambda: a @ a)
    bandwidth = 2 * src.numel() * 4 / seconds(lambda: dst.copy_(src))
    return Device(f"this CPU ({torch.get_num_threads()} threads, {dtype_name} matmul)", flops / 1e12,
                  bandwidth / 1e9, math.inf, matmul_efficiency=1.0)
