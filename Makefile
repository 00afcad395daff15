# Two commands do everything on a fresh machine:
#   make demo   builds .venv, then runs the whole DPO loop offline on a tiny model
#   make test   builds .venv (and Chromium for the browser tests), then runs every test
PYTHON ?= python3
VENV   ?= .venv
# On this machine kind torch==2.13.0 is a CPU build lying on local disk; elsewhere set
# TORCH_SPEC (for example TORCH_SPEC="torch" on a CUDA machine).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench bench-lora clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/preftune demo --out runs/demo

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not browser and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

bench: $(STAMP)
	$(PY) bench/bench_dpo.py --configs preftune,preftune-precompute,trl,trl-no-ckpt --rounds 5 --json bench/results/cpu-6m.json

bench-lora: $(STAMP)
	$(PY) bench/bench_dpo.py --configs preftune-lora,trl-lora,trl-lora-no-ckpt --rounds 5 --json bench/results/cpu-6m-lora.json

clean:
	rm -rf $(VENV) runs .pytest_cache
