#!/usr/bin/env bash
# The GPU checks and measurements in one run, for a machine with a CUDA GPU and torch, torchvision,
# timm, h5py and scikit-learn already installed (about 6 minutes on one H200). Results go to
# ${OUT:-bench/results}. Usage, from the repository root:  bash bench/gpu.sh
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# the CUDA paths, tested: autocast, pinned batches, GPU JPEG decoding, the L-BFGS sweep on the GPU
# (these two files import nothing the GPU machine lacks; the packaged lite0 weights are not there)
python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_decode.py 2>&1 | tee "$out/cuda-tests.log"
# resnet50 on ImageNet-sized JPEGs, decoded on the GPU, against the bf16 ceiling and a 16-worker peer
python3 bench/extract.py --device cuda --models resnet50 --widths 400,600 --images 5000 --skip-quality \
    --json "$out/extract-gpu.json" 2>&1 | tee "$out/extract-gpu.log"
