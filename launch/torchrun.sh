#!/usr/bin/env bash
# One node, all its GPUs (or N CPU processes): edit the settings, then `bash launch/torchrun.sh [section.key=value ...]`.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings -------------------------------------------------------------------------------------------
CONFIG=${CONFIG:-vlora/configs/demo.yaml}   # your YAML config (see vlora/config.py for every key)
if [ -z "${NPROC:-}" ]; then                 # processes = GPUs on this node; 2 CPU processes (gloo) without any
    NPROC=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 0)
    [ "${NPROC}" -gt 0 ] || NPROC=2
fi
# ---------------------------------------------------------------------------------------------------------

[ -f .venv/bin/activate ] && source .venv/bin/activate
exec torchrun --standalone --nproc_per_node "${NPROC}" train.py --config "${CONFIG}" "$@"
