#!/usr/bin/env bash
# One prepared run on a CUDA machine: every shipped real-model config at full size with random weights
# (tools/measure_full_size.py), then the CUDA-only tests. gsplat's CUDA extension builds in the
# background while the finetune configs run (they do not render).
# Usage (repo root): bash tools/gpu_full_size.sh [OUTDIR]   (wheels for missing packages in .whl/)
set -u
out=${1:-${OUT:-outputs/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ -d .gpu_data ] && [ ! -e ../shared/data/test_garden.npz ]; then
  mkdir -p ../shared/data && cp .gpu_data/* ../shared/data/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
(start=$(date +%s); python3 -c "from gsplat.cuda._backend import _C; print('gsplat CUDA extension loaded:', _C is not None)" 2>&1 | tail -5; echo "gsplat build seconds: $(( $(date +%s) - start ))") > "$out/gsplat_build.txt" 2>&1 &
build=$!
work=${WORK:-/tmp/measure_work}
timeout 300 python3 tools/measure_full_size.py --out "$out/finetune" --work "$work" --configs videorepa_2b_sft videorepa_5b_lora repa_baseline 2>&1 | tail -60 > "$out/measure_finetune.txt"
wait $build
cat "$out/gsplat_build.txt"
timeout 240 python3 tools/measure_full_size.py --out "$out/edit" --work "$work" --configs romap_sd3 sds_sd21 ip2p 2>&1 | tail -60 > "$out/measure_edit.txt"
tail -n 8 "$out/measure_finetune.txt" "$out/measure_edit.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_render.py tests/test_editor.py 2>&1 | tail -30 | tee "$out/pytest_cuda.txt"
