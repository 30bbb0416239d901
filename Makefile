# The two commands of the README: `make demo` and `make test`. Each creates the environment first
# (idempotent: a stamp file keyed on pyproject.toml + constraints.txt makes a second run instant).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Keep any op DeepSpeed JIT-compiles between runs (on CPU it builds none: robustfm.train.strategies).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/robustfm/torch_extensions
# Tests and the demo never reach a model hub.
export HF_HUB_OFFLINE ?= 1

.PHONY: env demo test lint bench clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools<82" wheel
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: env
	$(PY) jobs/cgclip.py --config configs/cgclip/demo.yaml

# Two workers, one per core of CI: the suite is CPU-bound (end-to-end jobs, each with its own Ray processes).
# Work-stealing balances the long end-to-end tests; each worker starts its own session Ray (tests/conftest.py).
test: env
	$(PY) -m pytest tests -n 2 --dist worksteal --durations=25

lint: env
	$(VENV)/bin/ruff check robustfm jobs tests benchmarks
	$(VENV)/bin/ruff format --check robustfm jobs tests benchmarks

bench: env
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache

# The GPU acceptance check (README "Checking on a GPU"): the dry run first (every item on CPU, so a broken script never
# reaches a rare GPU window), then the offline bundle in .gpu/ and the one command to run on the GPU machine.
.PHONY: gpu-check
gpu-check: env
	$(PY) benchmarks/gpu_acceptance.py outputs/gpu-check-dry-run --dry-run
	$(PY) benchmarks/prepare_gpu_bundle.py
