#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (CPU, tiny models, real TREC files when TREC_DATA_DIR is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test
python -m pytest -q tests "$@"
