# The README's two commands. Both build .venv first (Python 3.11+ and pip are all they need).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build of torch first so that no CUDA packages are pulled in.
# GPU users: `make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo`
# (or any torch build of theirs, installed into .venv before `make`).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench-ci gpu-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The ci benchmark suite, then the regression gate against benchmarks/baseline/ci.json.
bench-ci: $(STAMP)
	$(BIN)/python -m benchmarks ci
	$(BIN)/python -m benchmarks compare

# On a CUDA machine (with a CUDA build of torch, see TORCH above): the kernel and fused-loss tests
# with the compiled kernels on the GPU, then the gpu benchmark suite (results in benchmarks/results/gpu/).
gpu-check: $(STAMP)
	DISTILL_TEST_DEVICE=cuda $(BIN)/python -m pytest -q tests/test_kernels.py tests/test_fused_loss.py
	$(BIN)/python -m benchmarks gpu

lint: $(STAMP)
	$(BIN)/ruff check distill kernels tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun
