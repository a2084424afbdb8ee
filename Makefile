# Quick start: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gendistill render assets/scenes/snowman.ply --path orbit --frames 48 --size 256x256 --background 1,1,1 --out outputs/demo

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) tools/bench_render.py

clean:
	rm -rf $(VENV) outputs
