#!/usr/bin/env bash
# Sourced by run_demo.sh and run_tests.sh: a virtualenv in .venv with the CPU build of torch (from the
# local wheel where the machine has one) and trec-accel with the given extras. Idempotent.
set -euo pipefail
extras=${1:-}
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
DS_BUILD_OPS=0 python -m pip install -q -e ".${extras:+[$extras]}"
# TREC's original files: beside the checkout on our machines, else the hub.
if [ -z "${TREC_DATA_DIR:-}" ] && [ -d ../shared/data/trec ]; then
  TREC_DATA_DIR=$(cd ../shared/data/trec && pwd)
  export TREC_DATA_DIR
fi
