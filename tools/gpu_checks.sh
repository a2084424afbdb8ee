#!/usr/bin/env bash
# One prepared run on a CUDA machine: build gsplat's CUDA extension, run the CUDA-only tests
# (parity of our backends with gsplat), then the render, alignment and edit-step benchmarks on the GPU.
# Usage (repo root): bash tools/gpu_checks.sh [OUTDIR]   (wheels for missing packages in .whl/)
set -u
out=${1:-${OUT:-outputs/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD
if [ -d .gpu_data ] && [ ! -e ../shared/data/test_garden.npz ]; then
  mkdir -p ../shared/data && cp .gpu_data/* ../shared/data/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
start=$(date +%s)
python3 -c "from gsplat.cuda._backend import _C; print('gsplat CUDA extension loaded:', _C is not None)" 2>&1 | tail -5 | tee "$out/gsplat_build.txt"
echo "gsplat build seconds: $(( $(date +%s) - start ))" | tee -a "$out/gsplat_build.txt"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_render.py tests/test_editor.py 2>&1 | tail -40 | tee "$out/pytest_cuda.txt"
python3 tools/bench_render.py --backends gsplat,torch --repeats 5 2>&1 | tail -30 | tee "$out/bench_render_cuda.txt"
python3 tools/bench_align.py --device cuda 2>&1 | tail -20 | tee "$out/bench_align_cuda.txt"
python3 tools/bench_edit.py --device cuda --sizes 64 128 256 --repeats 3 2>&1 | tail -8 | tee "$out/bench_edit_cuda.txt"
