"""Several training runs in one torchrun launch: its workers start (and import torch) once and train
the runs one after the other, each through ``sdd-train``'s own ``main`` with its own arguments, joining
a fresh process group for each (the run's ``close_world`` ends it). A launch costs about 7 s on 2 CPU
cores before any training starts; the multi-rank tests and ``make matrix`` pay it once per pool.

Each run rendezvouses through a store of its own (rank 0's, on a free port rank 0 picks and passes
on through torchrun's store), not torchrun's: a process group created again under torchrun's store
finds the previous group's addresses there under the same keys, and a rank that reads them before
they are overwritten connects to a closed port.

A run that fails (exit other than 0 or 2) ends the pool: the other ranks may be waiting in a
collective that will not come, and torchrun stops them. The runs after it report "not run".

    python -m torch.distributed.run --nproc_per_node=N tests/rank_pool.py WORK   # WORK/jobs.json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SDD_TRAIN_DIST_TIMEOUT": "300"}


@dataclass
class PoolResult:
    code: int | None  # the run's exit code (every rank's); None when it did not run, or the ranks disagree
    output: str  # rank 0's stdout and stderr, then the other ranks' stderr
    seconds: float
    ran: bool = True  # False: the pool stopped before this run (an earlier one failed, or a timeout)


def launch(nproc: int, jobs: list[list[str]], work: Path, timeout: float = 1800) -> list[PoolResult]:
    """Run ``jobs`` (sdd-train argument lists) in one torchrun launch of ``nproc`` workers."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, str(work)]
    try:
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
        launcher = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        launcher = f"the pool timed out after {timeout:.0f} s"
    results = []
    for i in range(len(jobs)):
        ranks = [json.loads(f.read_text()) for r in range(nproc) if (f := work / f"job{i}.rank{r}.json").is_file()]
        if not ranks:
            results.append(PoolResult(None, f"not run: the pool stopped before it\n{launcher[-4000:]}", 0.0, ran=False))
            continue
        codes = [r["code"] for r in ranks]
        output = "".join(r["output"] for r in ranks)
        if len(ranks) < nproc or len(set(codes)) > 1:  # a rank died or hung in this run: torchrun's report
            output = f"exit codes {codes} from {len(ranks)} of {nproc} ranks\n{output}{launcher[-4000:]}"
        code = codes[0] if len(ranks) == nproc and len(set(codes)) == 1 else None
        results.append(PoolResult(code, output, max(r["seconds"] for r in ranks)))
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _work(work: Path) -> None:
    """A worker: every job in turn; a failed one ends this process (and so the pool)."""
    import torch

    from sdd_train.train.__main__ import main

    rank = int(os.environ["RANK"])
    agent = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    for i, args in enumerate(json.loads((work / "jobs.json").read_text())):
        if rank == 0:
            agent.set(f"rank_pool/port/{i}", str(_free_port()))
        os.environ["MASTER_PORT"] = agent.get(f"rank_pool/port/{i}").decode()
        out = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(args)
            except BaseException:  # a crash is this job's result
                traceback.print_exc()
                code = 1
        torch._dynamo.reset()  # the next run's compiled graphs are its own, not recompiles of these
        torch.use_deterministic_algorithms(False)
        text = out.getvalue()
        record = {"code": code, "seconds": time.perf_counter() - start,
                  "output": text if rank == 0 else "".join(f"[rank{rank}]: {line}\n" for line in text.splitlines())}
        (work / f"job{i}.rank{rank}.json").write_text(json.dumps(record))
        if code not in (0, 2):
            sys.stderr.write(f"rank_pool: job {i} exited {code}; the pool stops\n{text[-4000:]}")
            sys.stderr.flush()
            os._exit(1)


if __name__ == "__main__":
    _work(Path(sys.argv[1]))
