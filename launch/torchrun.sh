#!/usr/bin/env bash
# One node, all its GPUs (or N CPU processes): edit the settings, then `bash launch/torchrun.sh [section.key=value ...]`.
# Each setting can also be given in the environment: `NPROC=4 CONFIG=my.yaml bash launch/torchrun.sh optim.lr=1e-4`.
# DeepSpeed ZeRO instead of plain DDP: `ENGINE=zero3 bash launch/torchrun.sh` (ENGINE below).
#
# Stopping: SIGTERM or SIGUSR1 to this script (it becomes torchrun) reaches every training process, which
# finishes its step, saves a checkpoint, writes runs/NAME/PREEMPTED and exits; continue with run.resume=auto.
# torchrun itself then exits 1 (it reports the signal it got, not how the workers ended): look at PREEMPTED.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings -------------------------------------------------------------------------------------------
CONFIG=${CONFIG:-vlora/configs/demo.yaml}   # your YAML config (see vlora/config.py for every key)
if [ -z "${NPROC:-}" ]; then                 # processes = GPUs on this node; 2 CPU processes (gloo) without any
    NPROC=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 0)
    [ "${NPROC}" -gt 0 ] || NPROC=2
fi
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}   # seconds a signalled run gets to finish its step and save before SIGKILL
ENGINE=${ENGINE:-}                          # DeepSpeed: zero2 | zero3 | zero3_offload (ds_configs/NAME.json) or a .json; ddp; empty = as CONFIG says
# ---------------------------------------------------------------------------------------------------------

if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
# ENGINE as overrides placed before the command line's own, which win.
case "${ENGINE}" in
    "") engine_args=() ;;
    ddp) engine_args=(run.engine=ddp) ;;
    *.json) engine_args=(run.engine=deepspeed "run.deepspeed_config=${ENGINE}") ;;
    *) engine_args=(run.engine=deepspeed "run.deepspeed_config=ds_configs/${ENGINE}.json") ;;
esac
# torchrun forwards only the signals it is told to handle (SIGUSR1 is not in its default list: without it,
# SIGUSR1 would kill torchrun and leave the training processes running, orphaned).
exec torchrun --standalone --nproc_per_node "${NPROC}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT}" \
    train.py --config "${CONFIG}" ${engine_args[@]+"${engine_args[@]}"} "$@"
