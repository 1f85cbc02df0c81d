"""Throughput in the metrics records: tokens/s, step time, MFU, peak memory, ETA."""

from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import torch

from sdd_train.distributed.parallelize import compile_enabled
from sdd_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from sdd_train.train.train_module import StepOutput
    from sdd_train.train.trainer import Trainer

# Peak dense bf16 FLOP/s per device, for MFU when train.peak_tflops is not set (SPEC section 9).
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}


def peak_tflops(cfg_value: float | None, device: torch.device) -> float | None:
    if cfg_value is not None:
        return cfg_value
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class SpeedCallback(Callback):
    """tokens/s and s/step average the steps since the previous record (their own time: evaluation
    and checkpoints are left out); MFU counts the model's training FLOPs per token against the
    device's peak. The first step of a process includes compiling, so the ETA starts after it."""

    name = "speed"
    priority = 80

    def on_fit_start(self, trainer: Trainer) -> None:
        t = trainer.cfg.train
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.peak = peak_tflops(t.peak_tflops, trainer.world.device)
        self.flops_per_token = trainer.module.num_flops_per_token(t.seq_len)
        self.compiled = compile_enabled(t.compile, trainer.world.device)
        self.first_step = trainer.step + 1
        self.eta_origin: tuple[float, int] | None = None  # (time, step) at the end of the first step
        self.steps, self.seconds = 0, 0.0

    def post_train_step(self, trainer: Trainer, step: int, out: StepOutput) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.seconds += out.step_time
        if step == self.first_step:
            self.eta_origin = (now, step)
            if self.compiled:
                trainer.log(f"step {step} compiled the model ({out.step_time:.1f} s); the ETA counts from the next step")
        if not (trainer.is_log_step(step) and out.finite):
            return
        tokens_per_sec = self.steps * self.tokens_per_step / self.seconds
        trainer.record_metric("tokens_per_sec", tokens_per_sec)
        trainer.record_metric("step_time", self.seconds / self.steps)
        trainer.record_metric("peak_mem_gib", peak_memory_gib(trainer.world.device))
        origin_time, origin_step = self.eta_origin
        if step > origin_step:
            trainer.record_metric("eta_s", (trainer.cfg.train.max_steps - step) * (now - origin_time)
                                  / (step - origin_step))
        if self.peak is not None:
            trainer.record_metric("mfu", self.flops_per_token * tokens_per_sec / trainer.world.world_size
                                  / (self.peak * 1e12))
        self.steps, self.seconds = 0, 0.0

    def on_rollback(self, trainer: Trainer, step: int) -> None:
        self.steps, self.seconds = 0, 0.0
