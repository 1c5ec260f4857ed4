#!/usr/bin/env bash
# Called by .ci/run after the package is installed: start the single-node SLURM cluster that
# tests/test_slurm.py submits real jobs to. shared/ sits beside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
script=../shared/slurm/start_local_slurm.sh
if [ ! -f "$script" ]; then
  echo ".ci/start_slurm.sh: $script not found; the SLURM tests need the local cluster" >&2
  exit 1
fi
if ! bash "$script"; then
  echo ".ci/start_slurm.sh: starting the local SLURM cluster failed (see the log tails above)" >&2
  exit 1
fi
sinfo

