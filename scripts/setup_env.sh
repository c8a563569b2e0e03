#!/usr/bin/env bash
# Sourced by run_demo.sh and run_tests.sh: a virtualenv in .venv with torch and trec-accel with the given
# extras, its dependencies at the versions in constraints.txt (the set the tests last passed with).
# Idempotent. Environment:
#   TORCH_SPEC   the torch requirement (default torch==2.13.0: on our CPU machines a local CPU build; where
#                pip reaches PyPI on Linux, that release's CUDA build). A torch already in .venv that
#                satisfies it is kept, so a CUDA build installed there by hand stays.
#   CONSTRAINTS  the constraints file (default constraints.txt); empty: the newest releases setup.cfg allows,
#                for trying a new release before moving the pins (README, "Dependencies").
set -euo pipefail
extras=${1:-}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
constraints=${CONSTRAINTS-constraints.txt}
DS_BUILD_OPS=0 python -m pip install -q ${constraints:+-c "$constraints"} -e ".${extras:+[$extras]}"
# TREC's original files: beside the checkout on our machines, else the hub.
if [ -z "${TREC_DATA_DIR:-}" ] && [ -d ../shared/data/trec ]; then
  TREC_DATA_DIR=$(cd ../shared/data/trec && pwd)
  export TREC_DATA_DIR
fi
