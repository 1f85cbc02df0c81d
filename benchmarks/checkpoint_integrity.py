"""What the checkpoint checksums cost: a DCP save of the dense 1B model's fp32 weights (one process),
then the checksum pass over what it wrote (XXH3-128, what the manifest uses, and BLAKE2b-128, the
fallback without xxhash), as a share of the save.

    python benchmarks/checkpoint_integrity.py [--dir /tmp/ckpt_bench] [--params 1178707968]

The files are read back right after they were written, as the checkpointer does: from the page
cache where memory allows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import write_json  # noqa: E402
from sdd_train.checkpoint.manifest import HASHES, checkpoint_files, file_checksum  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/ckpt_bench")
    parser.add_argument("--params", type=int, default=1_178_707_968, help="fp32 parameters (default: dense 1B)")
    parser.add_argument("--tensors", type=int, default=16, help="split into this many tensors (16 layers' worth)")
    parser.add_argument("--json", default="runs/bench/checkpoint_integrity.json")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    per = args.params // args.tensors
    state = {f"layer_{i}": torch.randn(per) for i in range(args.tensors)}
    start = time.perf_counter()
    dcp.save(state, checkpoint_id=str(root), no_dist=True)
    save_s = time.perf_counter() - start
    files = checkpoint_files(root)
    size = sum((root / f).stat().st_size for f in files)
    results = {"bytes": size, "files": len(files), "save_s": save_s}
    for algorithm in HASHES:
        start = time.perf_counter()
        for f in files:
            file_checksum(root / f, algorithm)
        seconds = time.perf_counter() - start
        results[f"{algorithm}_s"] = seconds
        results[f"{algorithm}_share_of_save"] = seconds / save_s
        results[f"{algorithm}_gb_per_s"] = size / seconds / 1e9
    print(f"{size / 2**30:.2f} GiB in {len(files)} file(s): DCP save {save_s:.2f} s")
    for algorithm in HASHES:
        print(f"  {algorithm}: {results[f'{algorithm}_s']:.2f} s ({results[f'{algorithm}_gb_per_s']:.2f} GB/s),"
              f" {results[f'{algorithm}_share_of_save']:.1%} of the save")
    write_json(args.json, **results)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
