#!/usr/bin/env bash
# The two-node phase of CI (after the README's test command): switch the local SLURM cluster to
# its two-node mode (nodes n1 and n2 in separate network namespaces), run the tests marked
# two_node, and switch back to the single-node cluster whatever happened. The two modes cannot
# run at once, which is why this is a phase of its own. Needs root, like .ci/start_slurm.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
slurm=../shared/slurm
if [ ! -f "$slurm/start_local_slurm.sh" ]; then
  echo ".ci/two_node.sh: $slurm/start_local_slurm.sh not found; the two-node tests need the local cluster" >&2
  exit 1
fi
back_to_one_node() {
  bash "$slurm/stop_local_slurm.sh" >/dev/null 2>&1
  bash .ci/start_slurm.sh >/dev/null || echo ".ci/two_node.sh: restarting the single-node cluster failed" >&2
}
trap back_to_one_node EXIT
bash "$slurm/stop_local_slurm.sh" >/dev/null 2>&1
if ! LOCAL_SLURM_NODES=2 bash "$slurm/start_local_slurm.sh" >/dev/null; then
  echo ".ci/two_node.sh: starting the two-node cluster failed" >&2
  exit 1
fi
sinfo
python -m pytest -q -m two_node -rs tests/test_two_node.py
