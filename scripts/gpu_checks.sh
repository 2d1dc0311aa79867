#!/usr/bin/env bash
# The GPU checks of one device session, in priority order, each in its own time box under one overall deadline:
#
#   1. the Triton sparse-attention kernel's GPU tests (compiled, full size, against the fp32 reference bound);
#   2. `python -m accel.bench sparse --device cuda`: kernel rows at Wan-1.3B-480p length (32k tokens, 12 x 128),
#      the Triton kernel with the runs (SDPA over key slices) and FlexAttention backends timed beside it;
#   3. `python -m accel.bench quant --device cuda`: fp8 / int8 rows on a PixArt-XL-sized DiT under compile;
#   4. `python -m accel.bench gpu`: caching eager and compiled on PixArt-XL- and Wan-1.3B-sized DiTs.
#
# Usage: scripts/gpu_checks.sh OUT_DIR [DEADLINE_SECONDS [CHECK...]]: CHECKs (the names below) pick some, in the
# given order; docs/gpu-h200.txt holds the first run's outputs and how long each took. Each check writes OUT_DIR/<name>.txt (stdout and
# stderr, unbuffered, so a check stopped at its time box keeps what it printed) and this script prints each
# check's exit status and time. The project must be importable as `accel` from outside the checkout (an
# installed wheel): the checks run from /tmp so that the checkout's `accel/` folder does not shadow it.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_checks.sh OUT_DIR [DEADLINE_SECONDS [CHECK...]]}")
deadline=$(($(date +%s) + ${2:-540}))
shift $(($# < 2 ? $# : 2))
chosen=("$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

check() {  # check NAME LIMIT_SECONDS COMMAND...: run COMMAND from /tmp for at most LIMIT (or until the deadline)
    local name=$1 limit=$2 left start rc
    shift 2
    if ((${#chosen[@]})) && [[ " ${chosen[*]} " != *" $name "* ]]; then
        return
    fi
    left=$((deadline - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s left before the deadline" | tee "$out/$name.txt"
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    start=$(date +%s)
    (cd /tmp && timeout -k 10 "$limit" "$@") >"$out/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start))s$( ((rc == 124)) && echo ' (time box reached)')"
    tail -n 30 "$out/$name.txt"
}

(
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    cd /tmp && python3 -c "import torch, triton, diffusers, torchao, accel; print('torch', torch.__version__, '| triton', \
triton.__version__, '| diffusers', diffusers.__version__, '| torchao', torchao.__version__, '| accel', accel.__file__)"
) >"$out/env.txt" 2>&1
cat "$out/env.txt"

check tests-gpu 100 python3 -m pytest -q -m gpu -p no:cacheprovider "$repo/tests/test_sparse_triton.py"
check bench-sparse-gpu 170 python3 -m accel.bench sparse --device cuda --skip-end-to-end --repeats 5 --densities 0.1,0.2,0.3
check bench-quant-gpu 300 python3 -m accel.bench quant --device cuda --repeats 2 --gpu-steps 10
check bench-gpu 240 python3 -m accel.bench gpu --repeats 3
echo "== done at $(date -u +%T), $((deadline - $(date +%s)))s before the deadline"
