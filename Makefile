# Quick start: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-video test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch on Linux is PyPI's multi-GB CUDA build. Without a GPU,
	# tools/torch_index.py points pip at PyTorch's CPU wheel index when that answers within 2 s; otherwise
	# (CI has no route to it) the plain pin takes the CPU build of 2.13.0 in pip's local wheel folder.
	$(PY) -m pip install -q "torch==2.13.0" $$($(PYTHON) tools/torch_index.py)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/gendistill edit --config configs/splat_edit/demo_cpu.yaml
	$(PY) tools/check_demo.py --run outputs/demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/gendistill edit --config configs/splat_edit/demo_prompt_cpu.yaml
	$(PY) tools/check_demo.py --run outputs/demo-prompt --max-outside 0.02
	@echo "demo reports: outputs/demo/report.html, outputs/demo-prompt/report.html (the part found from the prompt alone)"

# the video half, offline: finetune the bundled tiny CogVideoX plainly and with TRD, generate, score the physics
demo-video: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m gendistill.video_distill.demo --out outputs/demo_video

# tests run 2-process torchrun jobs next to numba threads: idle OpenMP threads must not spin
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) tools/bench_render.py

clean:
	rm -rf $(VENV) outputs
