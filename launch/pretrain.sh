#!/usr/bin/env bash
# Pretraining on one or several nodes with the DeepSpeed launcher.
#
#   launch/pretrain.sh CONFIG.yaml [albef-bal pretrain options, e.g. --set train.lr=2e-4]
#
# Environment (all optional):
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" per line); default launch/hostfile if it
#                exists, else this node only
#   NUM_GPUS     GPUs per node to use (default: all)
#   MASTER_ADDR  address of the first node as the others see it (default: first host of
#                the hostfile; set it explicitly when hostnames do not resolve)
#   MASTER_PORT  rendezvous port (default 29500)
#   LAUNCH_ARGS  extra deepspeed launcher arguments, e.g. "--no_ssh_check"
# The launcher starts the ranks on other nodes over passwordless ssh (pdsh) and exports the
# variables listed in ./.deepspeed_env (NCCL_*, PYTHONPATH...) to them; see launch/README.md.
#
# Stopping: send SIGTERM or SIGUSR1 to this script, or to its whole process group as
# schedulers do. The launcher runs in a session of its own, so the signal does not reach it
# (it would kill the ranks 30 s later and exit 1); this script passes it to the ranks on this
# node, every rank finishes its step and saves a checkpoint, and the script exits 0. Run it
# again to continue (it always passes --resume auto).
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG=$1
shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
args=(--master_port "${MASTER_PORT:-29500}")
if [ -f "$HOSTFILE" ]; then
    args+=(--hostfile "$HOSTFILE")
fi
if [ -n "${MASTER_ADDR:-}" ]; then
    args+=(--master_addr "$MASTER_ADDR")
fi
if [ -n "${NUM_GPUS:-}" ]; then
    args+=(--num_gpus "$NUM_GPUS")
fi
# shellcheck disable=SC2206
args+=(${LAUNCH_ARGS:-})

# the launcher sets LOCAL_RANK for each rank it starts: that is how the ranks are found below
unset RANK LOCAL_RANK WORLD_SIZE
# --resume auto: a restarted job continues from its newest intact checkpoint
setsid --wait deepspeed "${args[@]}" --module albef_bal pretrain --config "$CONFIG" --resume auto "$@" &
LAUNCHER=$!

ranks_below() {  # the training processes under $1: the first ones down the tree with LOCAL_RANK set
    local child
    for child in $(pgrep -P "$1" || true); do
        if tr '\0' '\n' < "/proc/$child/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; then
            echo "$child"
        else
            ranks_below "$child"
        fi
    done
}

forward() {
    interrupted=1
    local pids
    pids=$(ranks_below "$LAUNCHER")
    if [ -n "$pids" ]; then
        echo "launch/pretrain.sh: SIG$1: passing it to the ranks ($(echo "$pids" | tr '\n' ' '))" >&2
        # shellcheck disable=SC2086
        kill -s "$1" $pids 2>/dev/null || true
    else  # ranks on other nodes only (pdsh): the launcher passes it on as it can
        echo "launch/pretrain.sh: SIG$1: no rank on this node; passing it to the launcher" >&2
        kill -s "$1" "$LAUNCHER" 2>/dev/null || true
    fi
}
for sig in TERM USR1 INT; do
    # shellcheck disable=SC2064
    trap "forward $sig" "$sig"
done

# `wait` returns early (status > 128) when a trapped signal arrives: wait again, until the
# launcher's own exit status comes back
while :; do
    interrupted=0
    status=0
    wait "$LAUNCHER" || status=$?
    if [ "$interrupted" = 0 ] || [ "$status" -le 128 ]; then
        break
    fi
done
exit "$status"
