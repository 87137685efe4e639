#!/usr/bin/env bash
# Multi-node launch: check the hostfile against the DeepSpeed config, then run the deepspeed launcher.
#
#   scripts/launch.sh HOSTFILE DS_CONFIG SCRIPT [script args...]
#   scripts/launch.sh hostfiles/mycluster ds_configs/zero2_bf16.json scripts/train_dalle.py \
#       --preset dalle-1.3b --dvae runs/dvae/final --data /data/shards --output-dir runs/dalle
#
# Environment (all optional):
#   MASTER_ADDR, MASTER_PORT   rendezvous (default: the first host, port 29500)
#   INCLUDE / EXCLUDE          DeepSpeed's host[:slots] filters, e.g. EXCLUDE=worker-3
#   LAUNCHER                   pdsh (default), openmpi, mvapich, slurm, mpich, impi
#   NO_SSH=1 NODE_RANK=i       start this node's ranks only, no ssh (one call per node; e.g. under
#                              SLURM: srun --ntasks-per-node=1 env NO_SSH=1 NODE_RANK=$SLURM_NODEID ...)
#   DS_ENV_VARS                space-separated names of variables to forward to every node (with
#                              ./.deepspeed_env's lines; default: the NCCL_*, FI_*, GLOO_*, CUDA_* set)
#   DS_EXTRA                   more launcher arguments, e.g. "--venv_script /opt/venv/bin/activate"
#
# Preemption: a TERM, USR1 or INT sent to this script (a scheduler's signal to the batch script,
# Ctrl-C) goes on to the ranks (INT as TERM), which save the step they reached and exit 75; this
# script waits for them and exits with the launcher's status (docs/training.md#preemption).
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
hostfile=$1 config=$2 script=$3
shift 3

python -m dalle_ds.distributed.cluster "$hostfile" --deepspeed_config "$config" \
    ${INCLUDE:+--include "$INCLUDE"} ${EXCLUDE:+--exclude "$EXCLUDE"} -- "$@"

# DeepSpeed exports the NAME=VALUE lines of its env file to every node. Ours lives in a temporary
# file (DS_ENV_FILE) that starts with your own ./.deepspeed_env, which is left untouched.
names=${DS_ENV_VARS:-$(compgen -e | grep -E '^(NCCL_|FI_|GLOO_|CUDA_|TORCH_NCCL_)' || true)}
env_file=$(mktemp "${TMPDIR:-/tmp}/dalle-ds-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
if [[ -f .deepspeed_env ]]; then
    cat .deepspeed_env >> "$env_file"
fi
for name in $names; do
    printf '%s=%s\n' "$name" "${!name}" >> "$env_file"
done
export DS_ENV_FILE=$env_file

args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
[[ -n ${MASTER_ADDR:-} ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n ${INCLUDE:-} ]] && args+=(--include "$INCLUDE")
[[ -n ${EXCLUDE:-} ]] && args+=(--exclude "$EXCLUDE")
[[ -n ${LAUNCHER:-} ]] && args+=(--launcher "$LAUNCHER")
if [[ ${NO_SSH:-0} == 1 ]]; then
    args+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi
# shellcheck disable=SC2206
[[ -n ${DS_EXTRA:-} ]] && args+=($DS_EXTRA)

# Ranks on this node (one node, or NO_SSH=1) are signalled themselves: DeepSpeed's launcher, when
# signalled, would stop them one after the other and exit 1. Remote ranks are reached through the
# runner, which stops them with SIGTERM (pdsh: pkill on every node).
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
    local launchers ranks
    launchers=$(pgrep -d, -P "$job" -f deepspeed.launcher.launch) || true
    if [[ -n $launchers ]]; then
        ranks=$(pgrep -d ' ' -P "$launchers") || true
        # shellcheck disable=SC2086
        kill -s "$1" $ranks 2>/dev/null || true
    else
        kill -s TERM "$job" 2>/dev/null || true
    fi
}

set -m  # the job gets its own process group: Ctrl-C reaches this script, which forwards it
deepspeed "${args[@]}" "$script" --deepspeed_config "$config" "$@" &
job=$!
set +m
trap 'forward TERM' TERM INT
trap 'forward USR1' USR1
while true; do
    status=0
    wait "$job" || status=$?
    kill -0 "$job" 2>/dev/null || break  # else a trapped signal interrupted the wait
done
# Ranks whose launcher died of a signal of their own (SLURM signals every process) run on: wait.
while kill -0 -- "-$job" 2>/dev/null; do
    sleep 1
done
exit "$status"
