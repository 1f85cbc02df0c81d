# sdd_train developer entry points. Everything runs inside .venv, created on first use.
#   make train   set up, then train the tiny default model on CPU from the embedded corpus
#   make test    set up, then run the test suite (what CI runs)
#   make bench   set up, then run the benchmarks (step time vs transformers, CPU ops, 1 vs 2 ranks, data, MoE layer, loss
#                memory; with CUDA also benchmarks/gpu_suite.py: GPU tests, fused-norm kernels, dense 1B and MoE MFU)
#   make soak    set up, then the fault-injection suite at length (kill -9, damaged checkpoints, a full disk, a dead
#                rank; not part of CI): its table goes into docs/reliability.md
#   make bench-gpu   only benchmarks/gpu_suite.py, with $(PYTHON) as it is (a GPU machine whose python already has
#                a CUDA torch and this package's dependencies; nothing is installed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
SOAK_ARGS ?=

.PHONY: setup train test bench bench-gpu soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

train: setup
	$(VENV)/bin/sdd-train configs/tiny.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/step_time.py $(ARGS)
	$(PY) benchmarks/cpu_ops.py
	$(PY) benchmarks/distributed_step.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/loss_memory.py
	$(PY) benchmarks/checkpoint_integrity.py
	$(PY) benchmarks/gpu_suite.py --skip-without-cuda

soak: setup
	$(PY) scripts/soak.py $(SOAK_ARGS)

bench-gpu:
	$(PYTHON) benchmarks/gpu_suite.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
