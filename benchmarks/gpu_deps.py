"""Run a GPU script where nothing can be downloaded (``make bench-gpu`` runs the GPU suite through this):

    python3 benchmarks/gpu_deps.py [--wheelhouse wheelhouse] benchmarks/gpu_suite.py [ARGS...]

installs the wheels ``make wheelhouse`` fetched for the GPU image's python (benchmarks/gpu_wheels.txt)
into WHEELHOUSE/site with no index, which leaves the image's own torch and everything else alone;
then imports every third-party module the suite's processes import and, if any fails, names them all
in one line and exits 2 before anything runs; else runs the script with that site on PYTHONPATH.
Standard library only, so that it runs where any of those modules is missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_LIST = ROOT / "benchmarks" / "gpu_wheels.txt"
VERSION_FILE = "python-version"  # `make wheelhouse` writes the python version it fetched for, e.g. 3.12

# Every third-party module the suite's processes import (pytest imports all of tests/ to select the
# GPU-marked tests), and what needs it.
IMPORTS = {
    "torch": "everything",
    "triton": "the fused-norm kernels and their tests",
    "numpy": "data loading, checkpoints, the kernel tests",
    "omegaconf": "configs",
    "yaml": "omegaconf, the sweep and report tests",
    "sentencepiece": "the tokenizer",
    "tqdm": "progress bars",
    "xxhash": "checkpoint checksums",
    "matplotlib": "sdd-report's figures (imported by the report tests)",
    "pytest": "the GPU tests",
}
# Those the GPU image's python 3.12 holds (the device notes' package list, read 2026-11-17; torch
# 2.11.0+cu130, triton 3.6.0). The others need a wheel in the wheel list.
IN_IMAGE = frozenset({"torch", "triton", "numpy", "yaml", "sentencepiece", "tqdm", "xxhash", "matplotlib", "pytest"})


def wheel_modules(path: Path = WHEEL_LIST) -> dict[str, str]:
    """Module -> requirement, from the wheel list's lines ``requirement  # module: what for``."""
    modules = {}
    for line in path.read_text().splitlines():
        requirement, _, comment = line.partition("#")
        if requirement.strip():
            modules[comment.split(":")[0].strip()] = requirement.strip()
    return modules


def install(wheelhouse: Path, site: Path) -> str | None:
    """Install every wheel in ``wheelhouse`` into an emptied ``site`` with no index; the reason it
    cannot, as one line, or None. A wheelhouse fetched for another python is refused."""
    shutil.rmtree(site, ignore_errors=True)  # nothing of an earlier install stays to shadow the image's packages
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    stamp = wheelhouse / VERSION_FILE
    built_for = stamp.read_text().strip() if stamp.is_file() else None
    if built_for is None:
        return f"{wheelhouse} has no {VERSION_FILE} file: make it with `make wheelhouse GPU_PYTHON_VERSION={here}`"
    if built_for != here or (sys.platform, platform.machine()) != ("linux", "x86_64"):
        return (f"{wheelhouse} holds wheels for python {built_for} on linux x86_64, this is python {here} on "
                f"{sys.platform} {platform.machine()} ({sys.executable}): `make wheelhouse GPU_PYTHON_VERSION={here}`")
    wheels = sorted(str(w) for w in wheelhouse.glob("*.whl"))
    if not wheels:
        return f"{wheelhouse} holds no wheels: `make wheelhouse`"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *wheels]
    if subprocess.run(pip).returncode != 0:
        return f"pip could not install {wheelhouse}'s wheels into {site} (its message is above)"
    return None


def missing() -> list[str]:
    """The modules that do not import, a module that lacks another named by the one it lacks."""
    names: list[str] = []
    for module in [*IMPORTS, *wheel_modules()]:
        try:
            importlib.import_module(module)
            continue
        except ModuleNotFoundError as e:
            name = (e.name or module).split(".")[0]
        except Exception as e:  # a broken install: a wrong-python extension, a missing shared library
            name = f"{module} ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        if name not in names:
            names.append(name)
    return names


def missing_line(names: list[str], wheelhouse: Path) -> str:
    """One line naming every missing module and its fix."""
    wheels = wheel_modules()
    carried = [n for n in names if n in wheels]
    others = [n for n in names if n not in wheels]
    fixes = []
    if carried:
        fixes.append(f"`make wheelhouse` where PyPI is reachable, then carry the folder {wheelhouse.name} with the "
                     "checkout" + (" (this one lacks them)" if wheelhouse.is_dir() else ""))
    if others:
        fixes.append(f"the GPU image's python (make bench-gpu PYTHON=...) or a line in {WHEEL_LIST.relative_to(ROOT)}")
    if carried and others:
        fixes = [f"{fix} for {', '.join(group)}" for fix, group in zip(fixes, (carried, others))]
    return f"gpu_deps: {sys.executable} cannot import {', '.join(names)}; fix: " + "; ".join(fixes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse",
                        help="wheels to install with no index first, when the folder exists")
    parser.add_argument("script", help="the python script to run once every import works")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.wheelhouse.is_dir():
        site = args.wheelhouse.resolve() / "site"
        if problem := install(args.wheelhouse, site):
            print(f"gpu_deps: {problem}", file=sys.stderr)
            return 2
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    if names := missing():
        print(missing_line(names, args.wheelhouse), file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, args.script, *args.args])


if __name__ == "__main__":
    sys.exit(main())
