# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-gpu lint bench bench-gpu chaos clean

# torch goes in first, pinned: an unpinned torch pulled in by another package downloads GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m dtrain train --config configs/digits.yaml run_dir=runs/demo
	$(VENV)/bin/dtrain ckpt ls runs/demo/checkpoints
	$(VENV)/bin/dtrain ckpt export runs/demo/checkpoints --best --out runs/demo/best-model.safetensors
	$(VENV)/bin/dtrain plot runs/demo
	@echo "summary:" && cat runs/demo/summary.json

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(VENV)/bin/pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check dtrain tests benchmarks examples
	$(VENV)/bin/mypy dtrain
	$(VENV)/bin/mypy --explicit-package-bases benchmarks

bench: $(STAMP)
	$(PY) benchmarks/checkpoint_io.py
	$(PY) benchmarks/agreement_overhead.py

# on a CUDA machine: checkpoints from GPU memory, dtrain against DCP (sync, async_save, load)
bench-gpu: $(STAMP)
	$(PY) benchmarks/checkpoint_gpu.py --sizes 1G,4G --repeats 3
	$(PY) benchmarks/checkpoint_gpu.py --sizes '' --largest --repeats 1 --append

# the reliability fault matrix; writes benchmarks/results/reliability.json
chaos: $(STAMP)
	$(PY) -m tests.reliability.report

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
