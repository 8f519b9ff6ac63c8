# `make demo` and `make test` do all set-up on a fresh machine (venv, pinned CPU torch, mtkit) first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)          # first, so nothing pulls a CUDA build of torch
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python launchers/train.py --config configs/mtl_minilm.yaml --out runs/mtl_minilm

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .cache
