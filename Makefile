# The README's two commands. Both build .venv first (Python 3.11+ and pip are all they need).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every package at the version that last passed the suite (CPU Linux, Python 3.11): `make lock`.
LOCK := requirements.lock
# The CPU build of torch goes in first, so that no CUDA packages are pulled in (README: "Installing
# for a GPU" for a CUDA build).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lock bench-ci gpu-check lint clean

# The lock as pip constraints for .venv. A torch already in .venv at the first install is the user's
# (a CUDA build): it and everything it requires, transitively (triton, nvidia-*, ...), stay as they
# are and out of the constraints; the lock pins every other package.
define CONSTRAINTS
import importlib.metadata as md, pathlib, re, sys
venv, lock = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
kept_file = venv / "kept.txt"
if not kept_file.exists():
    kept, todo = set(), ["torch"]
    while todo:
        name = norm(todo.pop())
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        if name not in kept:
            kept.add(name)
            todo += [re.match(r"[\w.-]+", r)[0] for r in requires if "extra ==" not in r]
    kept_file.write_text("".join(f"{k}\n" for k in sorted(kept)))
kept = set(kept_file.read_text().split())
pins = [line for line in lock.read_text().splitlines() if norm(line.split("==")[0]) not in kept]
(venv / "constraints.txt").write_text("\n".join(pins) + "\n")
endef
export CONSTRAINTS

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "$$CONSTRAINTS" $(VENV) $(LOCK)
	grep -q -x torch $(VENV)/kept.txt || $(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt $(TORCH)
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test,bench,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (end-to-end runs of the CLI, subprocesses, several ranks).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Re-resolve the newest releases in a scratch environment, run the suite there, and rewrite the lock
# only if it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(TORCH)
	.venv-lock/bin/python -m pip install --quiet -e ".[test,bench,ray]"
	.venv-lock/bin/python -m pytest -q
	{ echo "# Exact versions that passed the test suite (make lock): CPU Linux, Python 3.11."; \
	  echo "# make demo / make test install from here; torch carries no local tag, so a CUDA build matches."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E "^(pip)==" \
	    | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

# The ci benchmark suite, then the regression gate against benchmarks/baseline/ci.json.
bench-ci: $(STAMP)
	$(BIN)/python -m benchmarks ci
	$(BIN)/python -m benchmarks compare

# On a CUDA machine (with a CUDA build of torch, see TORCH above): the kernel and fused-loss tests
# with the compiled kernels on the GPU, then the gpu benchmark suite (results in benchmarks/results/gpu/).
gpu-check: $(STAMP)
	DISTILL_TEST_DEVICE=cuda $(BIN)/python -m pytest -q tests/test_kernels.py tests/test_fused_loss.py
	$(BIN)/python -m benchmarks gpu

# ruff, and the layers of distill (.importlinter): no import circles, nothing imports upwards.
lint: $(STAMP)
	$(BIN)/ruff check distill tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .venv-lock outputs multirun
