# `make test` and `make demo` create (or reuse) .venv, install the package, and run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Without CUDA, pin torch to the CPU build (see constraints-cpu.txt); with CUDA, leave it free.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test test-recovery test-cluster test-all test-fast demo bench clean

# --no-compile: pip would compile every module of every package (~25,000 files, minutes on 2 cores);
# cram_ray.precompile then writes the bytecode of the modules a stream imports, once
# (docs/performance.md, "Installing"; `python workflows/bench.py install` measures both).
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "installing cram_ray and its dependencies into $(VENV) (pip's messages: $(VENV)/install.log)"
	$(BIN)/pip install -q --no-compile $(CONSTRAINTS) -e ".[dev]" > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	$(BIN)/python -m cram_ray.precompile 2>> $(VENV)/install.log
	touch $(STAMP)

install: $(STAMP)

# `test` is the everyday suite; `test-recovery` kills drivers, workers and studies and checks what
# the reruns resume; `test-cluster` runs the two-node cluster and the GPU check on CPU. CI runs all
# three (.ci/run); README "Tests" has their measured times.
# The suites run several processes at once on few cores: torch's OpenMP threads sleep at barriers
# rather than spin (docs/performance.md, "Threads"); the demo keeps cram_ray's bounded spin.
test test-recovery test-cluster test-fast: export OMP_WAIT_POLICY ?= PASSIVE

# `make test` runs its test files in TEST_WORKERS processes (pytest-xdist): most of its time is
# waiting (Ray start-up, process spawns, polling), so two processes on two cores overlap it.
# A directory whose tests share a finished stream stays in one process (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadscope -m "not cluster and not recovery" tests

test-recovery: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m "recovery and not cluster" tests

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 -m cluster tests

test-all: test test-recovery test-cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not slow" tests

demo: $(STAMP)
	$(BIN)/python workflows/stream.py --config workflows/configs/tiny-cpu.yaml --executor ray --out runs/demo

bench: $(STAMP)
	$(BIN)/python workflows/bench.py rank

clean:
	rm -rf runs .pytest_cache
