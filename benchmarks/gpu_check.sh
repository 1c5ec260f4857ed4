#!/usr/bin/env bash
# One prepared GPU check of the fused neighbourhood-attention kernel (about 5 minutes on an
# H100/H200; every stage has its own timeout so the whole script stays under 8 minutes).
#   1. install the package (no deps: the machine's CUDA torch and triton are used as they are),
#      pytest, and NATTEN if a binary wheel exists (optional: its tests skip otherwise);
#   2. correctness on the GPU: Triton vs the torch path (fp16/bf16/fp32) and vs natten na2d
#      (fp16/bf16, tolerance 2e-2, dq/dk/dv incl. dv on 13x13), determinism at B=64 heads=16;
#   3. the benchmark (B=64 heads=16 16x16/13x13/32x32 d64 bf16) with a Triton tile sweep.
# Usage: bash benchmarks/gpu_check.sh            (prints everything; exit 1 if a test failed)
set -uo pipefail
cd "$(dirname "$0")/.."

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

echo "== install"
python -c "import mvar_dist" 2>/dev/null || timeout 120 pip install -q --no-build-isolation --no-deps -e . || exit 1
python -c "import pytest" 2>/dev/null || timeout 60 pip install -q pytest || exit 1
# natten ships CUDA builds per torch version; never build it from source here (tens of minutes).
python -c "import natten" 2>/dev/null || timeout 120 pip install -q --no-deps --only-binary=:all: natten \
    || echo "natten: no binary wheel for this torch/CUDA; natten comparisons will be skipped"
python -c "import natten; print('natten', natten.__version__)" 2>/dev/null || true

echo "== correctness on the GPU"
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_triton_kernel.py
tests_status=$?

echo "== benchmark"
timeout 240 python benchmarks/neighborhood_attention.py --sweep --grids 16 13 32
echo "== done (tests exit status ${tests_status})"
exit $(( tests_status != 0 ))
