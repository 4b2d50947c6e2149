#!/usr/bin/env bash
# The bladdergen pipeline as a plain shell script: the way a lab scripts it.
# Usage: bash pipeline.sh [RUN_DIR] [PROFILE]       (PROFILE: tiny on a CPU, paper on a 24 GB GPU)
#        CONFIG=my.yaml bash pipeline.sh ...        (settings on top of the profile)
# Every step is resumable: rerun the script after a kill and it continues.
set -euo pipefail
RUN=${1:-runs/scripted}
PROFILE=${2:-tiny}
mkdir -p "$RUN"
SETTINGS=(--profile "$PROFILE")
[ -n "${CONFIG:-}" ] && SETTINGS+=(--config "$CONFIG")
SIZE=${SIZE:-512}

# 1. Data: phantoms here; point RAW at your own images/ + labels/ (or nnU-Net, or DICOM) folder.
RAW="$RUN/raw"
[ -d "$RAW/images" ] || bladdergen phantom "$RAW" -n 24 --unlabeled 12 --size "$SIZE" --seed 0
bladdergen preprocess "$RAW" "$RUN/data" "${SETTINGS[@]}"   # a no-op when already done

# 2. Stage 1: the 3D VQ-GAN. --resume continues a killed run from its training state.
resume() { [ -f "$1/training_state.pt" ] && echo --resume || true; }
bladdergen train-vqgan "$RUN/data" "$RUN/vqgan" "${SETTINGS[@]}" $(resume "$RUN/vqgan")
bladdergen reconstruct "$RUN/vqgan" "$RUN/data" --json > "$RUN/vqgan_reconstruction.json"

# 3. Stage 2: latent diffusion, then 200 synthetic volumes (existing ones are skipped).
bladdergen train-ldm "$RUN/data" "$RUN/ldm" --vqgan "$RUN/vqgan" "${SETTINGS[@]}" $(resume "$RUN/ldm")
bladdergen sample -n "${SAMPLES:-200}" --ldm "$RUN/ldm" --out "$RUN/synthetic" --sampler ddim --steps 50 --seed 0

# 4. Stage 3: DeepAtlas with unlabeled + synthetic scans, and the supervised baseline.
bladdergen train-deepatlas "$RUN/data" "$RUN/deepatlas" --synthetic "$RUN/synthetic" \
    "${SETTINGS[@]}" $(resume "$RUN/deepatlas")
bladdergen train-deepatlas "$RUN/data" "$RUN/baseline" --supervised-only \
    "${SETTINGS[@]}" $(resume "$RUN/baseline")

# 5. Segment held-out labeled scans with both models and compare them.
TEST="$RUN/raw_test"
[ -d "$TEST/images" ] || bladdergen phantom "$TEST" -n 8 --size "$SIZE" --seed 10000
bladdergen segment "$RUN/baseline" "$TEST/images" "$RUN/pred/baseline" --overwrite
bladdergen segment "$RUN/deepatlas" "$TEST/images" "$RUN/pred/deepatlas" --overwrite
bladdergen evaluate seg --pred "$RUN/pred/baseline" --pred "$RUN/pred/deepatlas" \
    --truth "$TEST/labels" --out "$RUN/eval/seg"
bladdergen evaluate gen --synthetic "$RUN/synthetic" --real "$RUN/data" \
    --seg-model "$RUN/deepatlas" --out "$RUN/eval/gen"
echo "reports: $RUN/eval/seg/seg_report.md $RUN/eval/gen/gen_report.md"
