# loopstack: `make quickstart` runs the main job on CPU, `make test` runs the suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install quickstart test lint bench bench-gpu clean

install: $(STAMP)

# torch first, pinned (a local CPU wheel here, a CUDA build on GPU boxes), then the project with a
# constraint that keeps pip from replacing it with a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test,hf]'
	touch $(STAMP)

quickstart: install
	$(BIN)/python -m pretrain.quickstart

lint: install
	$(BIN)/ruff check loopstack pretrain data_pipeline launch tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q --durations=25 tests

bench: install
	$(BIN)/python -m benchmarks.run $(BENCH)

# The GPU check (benchmarks/gpu.py, README "GPU benchmark"): smoke + throughput in one budgeted command, results in
# benchmarks/results/gpu.json. No install step: on a GPU box after `make install` it uses .venv, elsewhere (the
# device machine) python3, which installs the wheels carried in .whl/ (scripts/gpu_wheels.sh) into /tmp/site
# itself. GPU_ARGS=--tiny runs the same code paths on CPU in seconds (results to a temporary path).
GPU_PY   ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
bench-gpu:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m benchmarks.gpu $(GPU_ARGS)

clean:
	rm -rf runs/quickstart .pytest_cache
