#!/usr/bin/env bash
# The bundled video model's training on one lease of a GPU (issue 12), as the device tool runs it: render and encode
# many clips of the 32 objects of data/emoji/video_objects32.json, then train one transformer per VARIANT side by
# side on the one GPU from the shipped export, each for MINUTES with the lr falling to zero at its deadline:
#
#   reinit: a new caption path (`dit --reinit-text`, lr 5e-4), the rest loaded: the path that learnt to bind
#           object names (the shipped 13,373-step export came from `... 4.2 400 128 cuda reinit keep`);
#   keep:   everything loaded (lr 3e-4): the default, to train the shipped export on.
#
# Each is exported (EMA weights, fp16) and its transformer weights and training summary are copied to OUT_DIR as
# VARIANT.safetensors and VARIANT.json, small enough to come back from the device (the checkpoints, with optimiser
# state, are not); the training logs stay in WORK-VARIANT.log, and their last lines are printed. Captions come from
# WORK's `captions` table (`train_video_model.py captions --work WORK --objects ...`, made where the text encoder
# is), so the text encoder need not travel.
#
# Usage: scripts/gpu_train_video.sh WORK OUT_DIR MINUTES [CLIPS_PER_OBJECT [BATCH [DEVICE [VARIANT...]]]]
set -euo pipefail
work=$(realpath -m "$1") out=$(realpath -m "$2") minutes=$3 clips=${4:-400} batch=${5:-128} device=${6:-cuda}
shift $(($# < 6 ? $# : 6))
variants=("${@:-keep}")
for variant in "${variants[@]}"; do
    [[ $variant == reinit || $variant == keep ]] || { echo "unknown variant $variant (reinit, keep)" >&2 && exit 2; }
done
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
common=(--objects data/emoji/video_objects32.json --init pipelines/default_video_model --device "$device")
start=$(date +%s)
python3 scripts/train_video_model.py encode --work "$work" "${common[@]}" --clips-per-object "$clips" --workers 8
echo "== encoded in $(($(date +%s) - start))s"
train=(dit "${common[@]}" --batch "$batch" --frame-batch "$batch" --minutes "$minutes" --decay-at-deadline
    --warmup 200 --save-minutes 1000 --threads 2)
for variant in "${variants[@]}"; do
    case $variant in
    reinit) options=(--reinit-text --lr 5e-4) ;;
    keep) options=(--lr 3e-4) ;;
    esac
    mkdir -p "$work-$variant"
    ln -sf "$work/encoded.safetensors" "$work-$variant/encoded.safetensors"
    python3 scripts/train_video_model.py "${train[@]}" --work "$work-$variant" "${options[@]}" \
        >"$work-$variant.log" 2>&1 &
done
wait
for variant in "${variants[@]}"; do
    python3 scripts/train_video_model.py export --work "$work-$variant" --out "$work-$variant/export" \
        --objects data/emoji/video_objects32.json --init pipelines/default_video_model ||
        { tail -n 20 "$work-$variant.log"; continue; }
    cp "$work-$variant/export/transformer/diffusion_pytorch_model.safetensors" "$out/$variant.safetensors"
    cp "$work-$variant/export/training.json" "$out/$variant.json"
    grep "dit step\|dit: \|Error" "$work-$variant.log" | tail -n 4 || true
done
echo "== trained and exported in $(($(date +%s) - start))s"
