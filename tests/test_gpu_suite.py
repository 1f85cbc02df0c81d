"""benchmarks/gpu_suite.py: the one command that produces every GPU number. Only its CPU side can
run here: the smoke run of its parts, its failure handling, and the verdicts it draws from results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_part_and_the_summary(suite, tmp_path):
    assert suite.main(["--smoke", "--parts", "ceilings", "dense", "loss", "--out", str(tmp_path)]) == 0
    ceilings = json.loads((tmp_path / "ceilings.json").read_text())
    assert ceilings["copy_tbps"] > 0 and ceilings["matmul_tflops"] > 0
    dense = json.loads((tmp_path / "dense.json").read_text())
    assert [r["block"] for r in dense["rows"]] == ["pre", "sdd"]
    loss = {r["path"]: r["loss"] for r in json.loads((tmp_path / "loss.json").read_text())["rows"]}
    assert loss["plain"] == pytest.approx(loss["chunked"], rel=1e-5)  # the same loss, two paths
    text = (tmp_path / "summary.md").read_text()
    assert "smoke" in text.splitlines()[0] and "| tiny sdd |" in text and "| loss chunked" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_unless_smoke(suite, tmp_path, capsys):
    assert suite.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_a_part_that_times_out_fails_the_suite_and_is_named(suite, tmp_path):
    assert suite.main(["--smoke", "--parts", "dense", "--timeout", "0.2", "--out", str(tmp_path)]) == 1
    assert "part dense timed out" in (tmp_path / "summary.md").read_text()
    assert "timed out after" in (tmp_path / "dense.log").read_text()


def _rows(**step_s: float) -> list[dict]:
    return [{"block": b, "step_s": s, "tokens_per_sec": 32768 / s, "mfu": 0.27 / s, "peak_mem_gib": 60.0}
            for b, s in step_s.items()]


def test_targets_are_judged_from_the_results(suite, tmp_path):
    (tmp_path / "dense.json").write_text(json.dumps({"config": "configs/dense_1b.yaml",
                                                     "rows": _rows(pre=0.50, reordered=0.51, sdd=0.52)}))
    (tmp_path / "moe.json").write_text(json.dumps({"config": "configs/moe_paper.yaml",
                                                   "rows": _rows(pre=1.0, sdd=1.0)}))
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": [
        {"case": c, "triton_fwd_s": 1e-4, "fwd_vs_copy": ratio, "triton_fwd_bwd_s": 3e-4, "torch_fwd_bwd_s": 9e-4,
         "fwd_gbps": 3000.0} for c, ratio in (("a", 1.1), ("b", 1.3))]}))
    lines, targets = suite.summary(tmp_path)
    verdicts = {what.split(" (")[0]: met for what, met in targets}
    assert verdicts == {"fused norm forward within 1.2x of a copy": False,  # the worst case counts
                        "dense sdd MFU >= 50%": True,  # 0.27 / 0.52 = 51.9%
                        "dense sdd step <= 1.03x pre": False,  # 1.04x
                        "moe sdd MFU >= 30%": False}  # 27%
    assert any("| dense_1b sdd | 0.520 s" in line and "1.040x pre" in line for line in lines)
