#!/usr/bin/env bash
# One node, all its GPUs (or N CPU processes): edit the settings, then `bash launch/torchrun.sh [section.key=value ...]`.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- settings -------------------------------------------------------------------------------------------
CONFIG=${CONFIG:-vlora/configs/demo.yaml}        # your YAML config (see vlora/config.py for every key)
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)} # processes = GPUs on this node
[ "${NPROC}" -gt 0 ] || NPROC=2                    # no GPU: 2 CPU processes over gloo
# ---------------------------------------------------------------------------------------------------------

exec torchrun --standalone --nproc_per_node "${NPROC}" train.py --config "${CONFIG}" "$@"
