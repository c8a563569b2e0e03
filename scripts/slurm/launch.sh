#!/usr/bin/env bash
# scripts/slurm/launch.sh -- THE one place the `accelerate launch` command is built.
#
# Run ONCE PER NODE inside the job step:   srun --ntasks-per-node=1 bash scripts/slurm/launch.sh [key=value ...]
# (never expand $SLURM_NODEID in the sbatch script: it must be read here, on each node.)
#
# Inputs (environment):
#   TRAIN_CONFIG        required, e.g. configs/mistral7b_coarse.yaml
#   ACCELERATE_CONFIG   default accelerate_configs/ddp.yaml
#   SCRIPT              default scripts/train.py (scripts/evaluate.py for evaluation)
#   MAIN_PORT           default 29500 (c10d rendezvous port on the head node)
#   RESUME              default "latest" -> appends resume=latest so a requeued job
#                       continues from its newest complete checkpoint; set RESUME= to omit
#   GPUS_PER_NODE       overrides SLURM_GPUS_ON_NODE (processes per node)
#   SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID, SLURM_GPUS_ON_NODE, SLURM_JOB_ID (from Slurm)
#   TREC_ACCEL_DRY_RUN=1  print the command (one line, shell-quoted) instead of running it
# Extra arguments ("$@") are passed through to the script (dotted.key=value overrides).
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }

# POSIX-shell quoting (parseable by shlex.split), one word at a time.
quote() {
    local s=$1
    if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/\'\\\'\'}"
    fi
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

[[ -n ${TRAIN_CONFIG:-} ]] || die "TRAIN_CONFIG is not set (e.g. TRAIN_CONFIG=configs/mistral7b_coarse.yaml)"
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/ddp.yaml}
SCRIPT=${SCRIPT:-scripts/train.py}
MAIN_PORT=${MAIN_PORT:-29500}
RESUME=${RESUME-latest}

[[ -n ${SLURM_JOB_NODELIST:-} ]] || die "SLURM_JOB_NODELIST is not set (run inside a Slurm allocation, via srun)"
NNODES=${SLURM_NNODES:-}
NODEID=${SLURM_NODEID:-}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
is_uint "$NNODES" && (( NNODES > 0 )) || die "SLURM_NNODES must be a positive integer (got '${NNODES}')"
is_uint "$NODEID" || die "SLURM_NODEID must be a non-negative integer (got '${NODEID}'; run via srun, once per node)"
(( NODEID < NNODES )) || die "SLURM_NODEID=${NODEID} is not below SLURM_NNODES=${NNODES}"
is_uint "$GPUS" && (( GPUS > 0 )) || die "GPUS_PER_NODE / SLURM_GPUS_ON_NODE must be a positive integer (got '${GPUS}'; use --gres=gpu:N)"
is_uint "$MAIN_PORT" || die "MAIN_PORT must be an integer (got '${MAIN_PORT}')"
[[ -f $ACCELERATE_CONFIG ]] || [[ ${TREC_ACCEL_DRY_RUN:-0} == 1 ]] || die "ACCELERATE_CONFIG file not found: ${ACCELERATE_CONFIG}"

# Head node = first host of the allocation; it hosts the c10d rendezvous store.
command -v scontrol >/dev/null 2>&1 || die "scontrol not found on PATH (needed to expand SLURM_JOB_NODELIST)"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) || true
[[ -n $HEAD ]] || die "could not resolve the head node from SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST}'"

cmd=(accelerate launch
     --quiet
     --config_file "$ACCELERATE_CONFIG"
     --num_machines "$NNODES"
     --num_processes "$(( NNODES * GPUS ))"
     --machine_rank "$NODEID"
     --main_process_ip "$HEAD"
     --main_process_port "$MAIN_PORT"
     --rdzv_backend c10d
     --max_restarts 0
     "$SCRIPT" --config "$TRAIN_CONFIG")
[[ -n $RESUME ]] && cmd+=("resume=${RESUME}")
cmd+=("$@")

if [[ ${TREC_ACCEL_DRY_RUN:-0} == 1 ]]; then
    line=""
    for w in "${cmd[@]}"; do line+="${line:+ }$(quote "$w")"; done
    printf '%s\n' "$line"
    exit 0
fi

echo "launch.sh: job ${SLURM_JOB_ID:-?} node ${NODEID}/${NNODES} ($(hostname)) head=${HEAD}:${MAIN_PORT} procs/node=${GPUS}" >&2
# SIGUSR1 is how the batch script asks training to checkpoint and stop. Slurm
# delivers it to every process of the step; the launcher (accelerate launch ->
# torchrun agent) would DIE on it (default action) and its workers with it, so the
# launcher ignores it. An ignored signal stays ignored across exec/fork, but
# scripts/train.py installs its own SIGUSR1 handler, so the workers still save.
trap '' USR1
exec "${cmd[@]}"
