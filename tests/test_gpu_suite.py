"""benchmarks/gpu_suite.py: the one command that produces every GPU number. Only its CPU side can
run here: the smoke run of its parts, its failure handling, and the verdicts it draws from results."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    return load_benchmark("gpu_suite")


def test_smoke_run_writes_every_part_and_the_summary(suite, tmp_path):
    parts = ["ceilings", "dense", "loss", "attention", "memory"]
    assert suite.main(["--smoke", "--parts", *parts, "--out", str(tmp_path)]) == 0
    ceilings = json.loads((tmp_path / "ceilings.json").read_text())
    assert ceilings["copy_tbps"] > 0 and ceilings["matmul_tflops"] > 0
    dense = json.loads((tmp_path / "dense.json").read_text())
    assert [r["block"] for r in dense["rows"]] == ["pre", "sdd"]
    loss = {r["path"]: r["loss"] for r in json.loads((tmp_path / "loss.json").read_text())["rows"]}
    assert loss["plain"] == pytest.approx(loss["chunked"], rel=1e-5)  # the same loss, two paths
    text = (tmp_path / "summary.md").read_text()
    assert "smoke" in text.splitlines()[0] and "| tiny sdd |" in text and "| loss chunked" in text
    assert "| memory estimate: smoke" in text
    assert "| document-masked attention: SDPA, dense mask (cpu)" in text


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


# benchmarks/gpu_deps.py: what `make bench-gpu` runs first on a GPU machine without network.
GPU_DEPS = ROOT / "benchmarks" / "gpu_deps.py"

# Imported only behind a guard or on paths the GPU suite does not take (exports, lm-eval, Parquet and
# Hugging Face datasets, W&B, flash-attn, step_time.py's transformers baseline, which the suite skips,
# downstream tasks).
NOT_IN_SUITE = {"safetensors", "transformers", "lm_eval", "datasets", "pyarrow", "wandb", "flash_attn", "olmo_eval"}


@pytest.fixture(scope="module")
def deps():
    return load_benchmark("gpu_deps")


def _run_deps(tmp_path: Path, *args: str, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """benchmarks/gpu_deps.py in a python whose import system cannot find the modules ``hide`` names."""
    code = (f"import runpy, sys\n"
            f"class Hide:\n"
            f"    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {hide!r}:\n"
            f"            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)\n"
            f"sys.meta_path.insert(0, Hide())\n"
            f"sys.argv = {[str(GPU_DEPS), *args]!r}\n"
            f"runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)


def _script(tmp_path: Path) -> Path:
    """A script that records that it ran, its arguments and what a wheelhouse module says."""
    script = tmp_path / "script.py"
    script.write_text("import sys\ntry:\n    import gpu_deps_probe\n    said = gpu_deps_probe.SAID\n"
                      "except ImportError:\n    said = None\n"
                      "open(sys.argv[1], 'w').write(repr([sys.argv[2:], said]))\n")
    return script


def _wheelhouse(tmp_path: Path, python_version: str) -> Path:
    """A wheelhouse as `make wheelhouse` leaves it, holding one pure-Python wheel."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    info = "gpu_deps_probe-1.0.dist-info"
    with zipfile.ZipFile(house / "gpu_deps_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("gpu_deps_probe.py", "SAID = 'installed with no index'\n")
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_deps_probe\nVersion: 1.0\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"gpu_deps_probe.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    (house / "python-version").write_text(python_version + "\n")
    return house


def test_every_missing_module_is_named_in_one_line_before_anything_runs(tmp_path):
    result = _run_deps(tmp_path, "--wheelhouse", str(tmp_path / "absent"), str(_script(tmp_path)),
                       str(tmp_path / "ran"), hide=("torch", "omegaconf", "xxhash"))
    assert result.returncode == 2 and not (tmp_path / "ran").exists()
    [line] = result.stderr.splitlines()
    assert "cannot import torch, omegaconf, xxhash; fix: `make wheelhouse`" in line
    assert line.endswith("for omegaconf; the GPU image's python (make bench-gpu PYTHON=...) or a line in "
                         "benchmarks/gpu_wheels.txt for torch, xxhash")


def test_the_wheelhouse_is_installed_with_no_index_then_the_script_runs(tmp_path):
    house = _wheelhouse(tmp_path, f"{sys.version_info.major}.{sys.version_info.minor}")
    result = _run_deps(tmp_path, "--wheelhouse", str(house), str(_script(tmp_path)), str(tmp_path / "ran"), "--x", "1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran").read_text() == repr([["--x", "1"], "installed with no index"])
    assert (house / "site" / "gpu_deps_probe.py").is_file()


def test_a_wheelhouse_for_another_python_is_refused(tmp_path):
    house = _wheelhouse(tmp_path, "3.9")
    result = _run_deps(tmp_path, "--wheelhouse", str(house), str(_script(tmp_path)), str(tmp_path / "ran"))
    assert result.returncode == 2 and not (tmp_path / "ran").exists() and not (house / "site").exists()
    [line] = result.stderr.splitlines()
    assert "holds wheels for python 3.9 on linux x86_64" in line
    assert line.endswith(f"`make wheelhouse GPU_PYTHON_VERSION={sys.version_info.major}.{sys.version_info.minor}`")


def _third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in the package, the tests and the suite's benchmarks."""
    files = [*ROOT.glob("sdd_train/**/*.py"), *ROOT.glob("tests/*.py"),
             *(ROOT / "benchmarks" / f"{name}.py" for name in ("gpu_suite", "kernels", "step_time", "loss_memory",
                                                               "record"))]
    ours = {"sdd_train", "benchmarks"} | {f.stem for f in ROOT.glob("tests/*.py")}
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - ours - set(sys.stdlib_module_names)


def test_every_module_the_suite_imports_is_checked_and_those_the_image_lacks_have_a_wheel(deps):
    unchecked = _third_party_imports() - NOT_IN_SUITE - set(deps.IMPORTS)
    assert not unchecked  # each goes into gpu_deps.IMPORTS, and into gpu_wheels.txt unless the image has it
    wheels = deps.wheel_modules()
    assert set(deps.IMPORTS) - deps.IN_IMAGE <= set(wheels) <= set(deps.IMPORTS)
    assert all("==" in requirement for requirement in wheels.values())  # one version each, as downloaded


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_makefile_fetches_what_gpu_deps_installs(deps):
    result = subprocess.run(["make", "-n", "wheelhouse", "bench-gpu", "ARGS=--parts dense"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    commands = " ".join(result.stdout.replace("\\\n", " ").split())
    assert "pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12" in commands
    assert "-d wheelhouse -r benchmarks/gpu_wheels.txt" in commands
    assert f"echo 3.12 > wheelhouse/{deps.VERSION_FILE}" in commands
    assert "benchmarks/gpu_deps.py --wheelhouse wheelhouse benchmarks/gpu_suite.py --parts dense" in commands
