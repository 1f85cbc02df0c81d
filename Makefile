# sdd_train developer entry points. Everything runs inside .venv, created on first use.
#   make train   set up, then train the tiny default model on CPU from the embedded corpus
#   make test    set up, then run the test suite (what CI runs)
#   make test-fast   the unit tests only (no training runs, processes or compiles: tests marked slow in
#                tests/conftest.py), the inner loop while editing
#   make bench   set up, then run the benchmarks (step time vs transformers, CPU ops, 1 vs 2 ranks, data, MoE layer, loss
#                memory; with CUDA also benchmarks/gpu_suite.py: GPU tests, fused-norm kernels, dense 1B and MoE MFU)
#   make soak    set up, then the fault-injection suite at length (kill -9, damaged checkpoints, a full disk, a dead
#                rank; not part of CI): its table goes into docs/reliability.md
#   make slurm-test  set up, then the Slurm tests (tests/test_slurm.py, ~15 min) on a one-node Slurm on this machine:
#                scripts/slurm/local_cluster.sh installs (apt, root) and starts it, and stops it afterwards
#                unless it was already running
#   make matrix  set up, then the feature matrix: every combination of ffn, block, grouped_mm, compile, activation
#                checkpointing, doc_mask, ranks, precision, param_dtype, loss path, z-loss and ep runs 3 steps
#                against its reference (hours; resumes from docs/matrix/results.jsonl; MATRIX_ARGS="--subset
#                pairwise" is CI's subset); its table goes into docs/matrix/table.md, a summary into docs/testing.md
#   make bench-peers   benchmarks/step_time.py beside OLMo-core's and torchtitan's transformers at our shape, from
#                their own venv .venv-peers (the extra `peers`, torch pinned as here: in .venv they would
#                downgrade datasets and huggingface_hub under transformers)
#   make wheelhouse  download into wheelhouse/ the wheels benchmarks/gpu_suite.py needs that the GPU image lacks
#                (benchmarks/gpu_wheels.txt), for its python (GPU_PYTHON_VERSION=3.12, linux x86_64); carry the
#                folder to the GPU machine with the checkout
#   make bench-gpu   only benchmarks/gpu_suite.py, with $(PYTHON) as it is (a GPU machine whose python has a CUDA
#                torch; no network needed): installs wheelhouse/ when there, with no index, into wheelhouse/site
#                (the image's packages untouched), checks every import first (exit 2 naming all missing), then runs
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
SOAK_ARGS ?=
# the tests run in TEST_WORKERS pytest-xdist processes, a test module to each (its module-scoped fixtures,
# such as test_distributed.py's pooled torchrun launch, then run once); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup train test test-fast bench bench-gpu soak clean

setup: $(VENV)/.installed

# torch comes from pip (pip's configuration may point at a local CPU wheel; uv does not read it); the other packages
# come from uv, which resolves and installs them in parallel, several times faster than pip, with torch held at
# the installed build so that no dependency can swap it for a CUDA build; uv compiles their bytecode at install
# (pip does for torch), so that no process compiles a module's source again on import
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" uv
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c $(VENV)/torch-pin.txt -e ".[dev]"
	touch $@

train: setup
	$(VENV)/bin/sdd-train configs/tiny.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q $(XDIST) tests

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

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

.PHONY: slurm-test
slurm-test: setup
	@was_up=$$(pgrep -x slurmctld >/dev/null && echo yes); \
	scripts/slurm/local_cluster.sh start || exit $$?; \
	SDD_TRAIN_SLURM_TESTS=1 $(PY) -m pytest -v -rA tests/test_slurm.py; rc=$$?; \
	[ -n "$$was_up" ] || scripts/slurm/local_cluster.sh stop; exit $$rc

MATRIX_ARGS ?=
.PHONY: matrix

matrix: setup
	$(PY) scripts/matrix.py $(MATRIX_ARGS)

PEERS_VENV ?= .venv-peers
PEERS ?= olmo-core torchtitan
.PHONY: bench-peers

$(PEERS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	echo "$(TORCH_SPEC)" > $(PEERS_VENV)/constraints.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet -c $(PEERS_VENV)/constraints.txt "$(TORCH_SPEC)"
	$(PEERS_VENV)/bin/python -m pip install --quiet -c $(PEERS_VENV)/constraints.txt -e ".[peers]" pytest
	touch $@

bench-peers: $(PEERS_VENV)/.installed
	$(PEERS_VENV)/bin/python benchmarks/step_time.py --no-hf --peers $(PEERS) $(ARGS)

WHEELHOUSE ?= wheelhouse
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
.PHONY: wheelhouse

wheelhouse:
	rm -rf $(WHEELHOUSE)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON_VERSION) $(addprefix --platform ,$(GPU_PLATFORMS)) \
		-d $(WHEELHOUSE) -r benchmarks/gpu_wheels.txt
	echo $(GPU_PYTHON_VERSION) > $(WHEELHOUSE)/python-version

bench-gpu:
	$(PYTHON) benchmarks/gpu_deps.py --wheelhouse $(WHEELHOUSE) benchmarks/gpu_suite.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
