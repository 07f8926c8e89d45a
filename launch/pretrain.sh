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
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
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
# --resume auto: a restarted job continues from its newest complete checkpoint
exec deepspeed "${args[@]}" --module albef_bal pretrain --config "$CONFIG" --resume auto "$@"
