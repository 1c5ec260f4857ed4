#!/usr/bin/env bash
# Every GPU measurement in one go, in at most 10 minutes (each stage has its own timeout; the
# script goes on past a failed stage): the Triton neighbourhood-attention kernel's correctness
# (vs the torch path and, if installed, NATTEN) and speed (B64 h16 16x16 d64 bf16, vs masked SDPA
# and NATTEN), a d16 batch-32 bf16 training step (VAR vs MVAR-all vs MVAR-paper, and MVAR-all with
# activation checkpointing), d16 batch-32 sampling (VAR with its KV cache vs MVAR) and mvar-dist
# plan's predicted memory vs CUDA max allocated (d16 batch 32 bf16 ZeRO-2), and mvar-dist evaluate's
# speed on 1,000 images. Writes
# $GPU_REPORT_DIR/report.json and report.md (default gpu_report/), plus each stage's log.
# Usage: bash benchmarks/gpu_check.sh            (exit 1 without a CUDA device or if the kernel tests failed)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_REPORT_DIR:-gpu_report}
mkdir -p "$OUT"
: > "$OUT/stages.txt"

stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, log it, record the outcome
  local name=$1 limit=$2 start code
  shift 2
  start=$(date +%s)
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  echo "$name $code $(( $(date +%s) - start ))" >> "$OUT/stages.txt"
  tail -n 5 "$OUT/$name.log"
}

stage environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python -c \"import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); assert torch.cuda.is_available()\""
# no deps: the machine's CUDA torch and triton are used as they are; natten only as a binary wheel
# (building it takes tens of minutes), its comparisons are skipped without one
stage install 60 bash -c "python -c 'import mvar_dist' 2>/dev/null || pip install -q --no-build-isolation --no-deps -e .; \
  python -c 'import pytest' 2>/dev/null || pip install -q pytest pytest-timeout; \
  python -c 'import natten' 2>/dev/null || pip install -q --no-deps --only-binary=:all: natten || echo 'natten: no binary wheel'"
stage kernel_tests 120 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_triton_kernel.py
stage kernel_speed 60 python benchmarks/neighborhood_attention.py --grids 16 --skip-memory --json "$OUT/kernel.json"
stage train_step 150 python benchmarks/train_step.py --depth 16 --batch 32 --precision bf16 \
  --variants var,mvar-all,mvar-paper,mvar-all+ckpt --json "$OUT/train_step.json"
stage sampling 60 python benchmarks/sampling.py --depth 16 --batch 32 --json "$OUT/sampling.json"
# mvar-dist plan's predicted memory vs CUDA max allocated: d16 batch 32 bf16 ZeRO-2 (docs/training.md, "Memory")
stage plan_check 120 python benchmarks/plan_check.py --batch 32 --json "$OUT/plan_check.json"
# mvar-dist evaluate's speed: Inception features and the whole command on 1,000 images (random weights)
stage evaluate 120 python benchmarks/evaluate.py --images 1000 --runs 1 --json "$OUT/evaluate.json"
python benchmarks/gpu_report.py "$OUT"
grep -q "^environment 0 " "$OUT/stages.txt" && grep -q "^kernel_tests 0 " "$OUT/stages.txt"
