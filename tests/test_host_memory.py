"""glibc malloc tuning for CPU training: freed tensors' memory is reused instead of faulted in anew."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from sdd_train.distributed.host_memory import ENV

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

# Allocate, fill and free a 64 MiB tensor a few times; print the minor page faults of the last round.
PROBE = """
import resource, sys, torch
from sdd_train.distributed.world import init_world
init_world("cpu")
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20).fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def page_faults(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_value is not None:
        env[ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_cpu_world_reuses_freed_memory_without_page_faults():
    """A CPU world (init_world) serves a re-allocated 64 MiB block from the kept heap: ~no page faults,
    where glibc's default (mmap per block, unmapped on free) faults in all 16,384 pages again."""
    tuned, system = page_faults(None), page_faults("system")
    assert system > 16_000, f"default malloc should fault every page of a fresh block, got {system}"
    assert tuned < 100, f"tuned malloc faulted {tuned} pages on a re-allocated block"
