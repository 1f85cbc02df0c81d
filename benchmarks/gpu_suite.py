"""Everything only a GPU can show, in one command: the device's ceilings, the GPU tests, the
fused-norm kernels, dense 1B and paper-MoE step time / MFU / peak memory, the chunked loss, and the
memory estimate against the allocator's peak.

    python benchmarks/gpu_suite.py [--out runs/gpu_suite] [--parts ceilings tests kernels dense moe loss]
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite   # tiny shapes on any device: checks the suite

Each part runs in its own process under its own time limit (``--timeout``), so an out-of-memory
error or a hang in one loses nothing of the others; its log and JSON land in ``--out``. The suite
ends with one table of the numbers docs/benchmarks.md asks for, the performance issue's GPU targets
marked met or missed, and writes the same as Markdown to ``OUT/summary.md``. Where one call's time
is capped, split the parts over calls (``--parts ceilings tests kernels``, then ``--parts dense``,
then ``--parts moe loss``): the summary covers every JSON already in ``--out``.
Exit code: 0 when every part ran, 1 when one failed or timed out, 2 without CUDA (0 with
--skip-without-cuda, as `make bench` runs it on any machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels import timer  # noqa: E402
from benchmarks.record import write_json  # noqa: E402

PARTS = ("ceilings", "tests", "kernels", "dense", "moe", "loss", "peers", "attention", "memory")
# The GPU targets: dense 1B sdd MFU, sdd / pre step time, fused-norm forward / copy, MoE MFU.
DENSE_MFU, SDD_OVER_PRE, NORM_OVER_COPY, MOE_MFU = 0.50, 1.03, 1.2, 0.30


# The smoke runs check the suite's plumbing: in fp32, as bf16 matrix products on a CPU without native
# bf16 (AVX2 only) take PyTorch's reference loop, seconds per tiny step.
SMOKE_PRECISION = ["--precision", "fp32"]


def commands(part: str, out: Path, smoke: bool) -> list[list[str]]:
    """The command lines of one part (a part with several writes one JSON per command)."""
    py = sys.executable
    bench = ROOT / "benchmarks"
    if part == "ceilings":
        return [[py, __file__, "--measure-ceilings", str(out / "ceilings.json")] + (["--smoke"] if smoke else [])]
    if part == "tests":
        pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
        if smoke:  # collection and the CUDA skips, nothing heavy
            return [pytest + ["-m", "gpu", str(ROOT / "tests" / "test_backends.py"),
                              f"--junitxml={out / 'tests_gpu_marked.xml'}"]]
        return [pytest + [str(ROOT / "tests" / "test_kernels.py"), f"--junitxml={out / 'tests_kernels.xml'}"],
                pytest + ["-m", "gpu", str(ROOT / "tests"), f"--junitxml={out / 'tests_gpu_marked.xml'}"]]
    if part == "kernels":
        return [[py, str(bench / "kernels.py"), "--json", str(out / "kernels.json")] + (["--smoke"] if smoke else [])]
    if part in ("dense", "moe"):
        step = [py, str(bench / "step_time.py"), "--no-hf", "--sequential", "--json", str(out / f"{part}.json")]
        if smoke:
            config = "configs/tiny.yaml" if part == "dense" else "configs/tiny_moe.yaml"
            return [step + ["--config", str(ROOT / config), "--blocks", "pre", "sdd", "--modes", "eager",
                            "--steps", "1", "--warmup", "1", *SMOKE_PRECISION, "--set", "train.global_batch_size=8",
                            "train.micro_batch_size=4", "train.seq_len=32"]]
        config, blocks = ("dense_1b", ["pre", "reordered", "sdd"]) if part == "dense" else ("moe_paper", ["pre", "sdd"])
        # 2 micro-batches of 4 x 4096 tokens, the chunked fused loss, compiled blocks
        return [step + ["--config", str(ROOT / "configs" / f"{config}.yaml"), "--blocks", *blocks,
                        "--modes", "compiled", "--steps", "10", "--set", "train.global_batch_size=8"]]
    if part == "peers":  # OLMo-core's and torchtitan's transformers beside ours (their rows where they are installed)
        step = [py, str(bench / "step_time.py"), "--no-hf", "--blocks", "pre", "sdd",
                "--peers", "olmo-core", "torchtitan"]
        if smoke:
            return [step + ["--config", str(ROOT / "configs" / "tiny.yaml"), "--modes", "eager", "--steps", "1",
                            "--warmup", "1", "--json", str(out / "peers_eager.json"), *SMOKE_PRECISION, "--set",
                            "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_len=32"]]
        return [step + ["--config", str(ROOT / "configs" / "dense_1b.yaml"), "--sequential", "--modes", mode, "--steps",
                        "10", "--json", str(out / f"peers_{mode}.json"), "--set", "train.global_batch_size=8"]
                for mode in ("compiled", "eager")]
    if part == "attention":  # document masks: FlexAttention vs SDPA's dense mask (vs flash-attn varlen)
        return [[py, str(bench / "doc_attention.py"), "--json", str(out / "attention.json")]
                + (["--smoke"] if smoke else [])]
    if part == "memory":  # sdd-train --estimate-memory against the caching allocator's peak
        smoke_args = ["--smoke"] if smoke else ["--device", "cuda"]
        return [[py, str(bench / "memory_estimate.py"), *smoke_args, "--json", str(out / "memory.json")]]
    if part == "loss":  # the dense 1B head: one micro-batch of 4 x 4096 tokens, d 2048, 100k vocabulary
        shape = ["--tokens", "256", "--d-model", "64", "--vocab", "1000", "--chunk", "64"] if smoke else \
            ["--tokens", "16384", "--d-model", "2048", "--vocab", "100352", "--chunk", "4096"]
        return [[py, str(bench / "loss_memory.py"), *shape, "--json", str(out / "loss.json")]]
    raise ValueError(part)


def run_part(part: str, out: Path, smoke: bool, timeout: float) -> str:
    """Run one part's commands, logging to ``OUT/<part>.log``; return 'ok', 'failed' or 'timed out'."""
    env = dict(os.environ)
    if smoke and not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the kernels' smoke run on a CPU
    status = "ok"
    with open(out / f"{part}.log", "w") as log:
        for cmd in commands(part, out, smoke):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            start = time.perf_counter()
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                log.write(f"\ntimed out after {timeout:.0f} s\n")
                return "timed out"
            log.write(f"\nexit {code} after {time.perf_counter() - start:.1f} s\n")
            if code != 0:
                status = "failed"
    return status


def measure_ceilings(path: str, smoke: bool) -> None:
    """The two rates every other number is judged by: a device-to-device copy (bytes read + written)
    and a bf16 matrix product on random data (zeros run faster than real data on some GPUs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.randn(2**20 if smoke else 2**29, device=device, dtype=torch.bfloat16)  # 1 GiB: far past the L2
    y = torch.empty_like(x)
    copy_s = timer(lambda: y.copy_(x), device, 3 if smoke else 50)
    n = 256 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_s = timer(lambda: a @ b, device, 3 if smoke else 50)
    write_json(path, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
               copy_bytes=2 * x.numel() * x.element_size(), copy_s=copy_s,
               copy_tbps=2 * x.numel() * x.element_size() / copy_s / 1e12,
               matmul_n=n, matmul_s=matmul_s, matmul_tflops=2 * n**3 / matmul_s / 1e12)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _junit(path: Path) -> str | None:
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"


def _step_row(r: dict, label: str, pre_step_s: float | None) -> str:
    mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU -"
    memory = f"{r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else "-"
    versus = f"{r['step_s'] / pre_step_s:.3f}x pre" if pre_step_s else ""
    return f"| {label} {r['block']} | {r['step_s']:.3f} s | {r['tokens_per_sec']:,.0f} tok/s | {mfu} | {memory} | {versus} |"


def summary(out: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    """Markdown lines of every result found in ``out`` and the targets as (description, met)."""
    lines = ["| what | value | | | | |", "|---|---|---|---|---|---|"]
    targets: list[tuple[str, bool]] = []
    if c := _load(out / "ceilings.json"):
        lines.append(f"| ceilings ({c['device']}, torch {c['torch']}) | copy {c['copy_tbps']:.2f} TB/s"
                     f" | bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s | | | |")
    for name in ("kernels", "gpu_marked"):
        if result := _junit(out / f"tests_{name}.xml"):
            lines.append(f"| tests: {name.replace('_', '-')} | {result} | | | | |")
    if k := _load(out / "kernels.json"):
        for r in k["rows"]:
            lines.append(f"| norm {r['case']} | fwd {r['triton_fwd_s'] * 1e6:.1f} us | {r['fwd_vs_copy']:.2f}x copy"
                         f" | f+b {r['triton_fwd_bwd_s'] * 1e6:.1f} us | PyTorch f+b {r['torch_fwd_bwd_s'] * 1e6:.1f} us"
                         f" | {r['fwd_gbps']:.0f} GB/s |")
        worst = max(r["fwd_vs_copy"] for r in k["rows"])
        targets.append((f"fused norm forward within {NORM_OVER_COPY}x of a copy (worst {worst:.2f}x)",
                        worst <= NORM_OVER_COPY))
    for part, mfu_target in (("dense", DENSE_MFU), ("moe", MOE_MFU)):
        if not (d := _load(out / f"{part}.json")):
            continue
        by_block = {r["block"]: r for r in d["rows"]}
        sdd, pre = by_block.get("sdd"), by_block.get("pre")
        lines += [_step_row(r, Path(d["config"]).stem, pre and pre["step_s"]) for r in d["rows"]]
        if sdd and sdd.get("mfu") is not None:
            targets.append((f"{part} sdd MFU >= {mfu_target:.0%} ({sdd['mfu']:.1%})", sdd["mfu"] >= mfu_target))
        if part == "dense" and sdd and pre:
            ratio = sdd["step_s"] / pre["step_s"]
            targets.append((f"dense sdd step <= {SDD_OVER_PRE}x pre ({ratio:.3f}x)", ratio <= SDD_OVER_PRE))
    for path in sorted(out.glob("peers_*.json")):  # each peer's step / ours, same mode
        peers = json.loads(path.read_text())
        lines += [f"| {q['peer']} / {q['block']} ({q['mode']}) | {q['ratio_of_medians']:.2f}x | | | | |"
                  for q in peers.get("ratios", [])]
    if loss := _load(out / "loss.json"):
        for r in loss["rows"]:
            lines.append(f"| loss {r['path']} ({loss['tokens']} x {loss['d_model']} -> {loss['vocab']})"
                         f" | {r['seconds']:.3f} s | peak {r['peak_gib']:.2f} GiB | loss {r['loss']:.4f} | | |")
    if memory := _load(out / "memory.json"):
        for r in memory["rows"]:
            lines.append(f"| memory estimate: {r['case']} | {r['estimate'] / 2**30:.2f} GiB | measured"
                         f" {r['measured'] / 2**30:.2f} GiB | {r['estimate'] / r['measured'] - 1:+.1%} | | |")
    if attn := _load(out / "attention.json"):
        for r in attn["rows"]:
            peak = f"peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
            lines.append(f"| document-masked attention: {r['case']} ({r['device']}) | {r['median_ms']:.2f} ms"
                         f" | {peak} | | | |")
    return lines, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_suite")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command of a part")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the suite)")
    parser.add_argument("--skip-without-cuda", action="store_true", help="without CUDA say so and exit 0 (make bench)")
    parser.add_argument("--measure-ceilings", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_ceilings:
        measure_ceilings(args.measure_ceilings, args.smoke)
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False); --smoke checks the suite on CPU")
        return 0 if args.skip_without_cuda else 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    for part in args.parts:
        start = time.perf_counter()
        statuses[part] = run_part(part, out, args.smoke, args.timeout)
        print(f"gpu_suite: {part} {statuses[part]} in {time.perf_counter() - start:.0f} s (log: {out / part}.log)",
              flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    title = f"gpu_suite {datetime.date.today()} on {device}, torch {torch.__version__}"
    lines, targets = summary(out)
    lines = [title + (" (smoke: these numbers check the suite, they measure nothing)" if args.smoke else ""),
             ""] + lines + [""] + [f"- [{'x' if met else ' '}] {what}" for what, met in targets]
    lines += [f"- part {part} {status}: see {part}.log" for part, status in statuses.items() if status != "ok"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
