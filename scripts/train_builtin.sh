#!/usr/bin/env bash
# Reproduce the built-in model (sdtorch/data/builtin.safetensors) from scratch on the procedural "shapes" data:
#   bash scripts/train_builtin.sh [RUN_DIR]
# CLIP and the VAE train side by side (one CPU thread each), then the UNet on both cores; the result is exported in
# fp16 with its config in the header, and evaluated by pixel analysis.
set -euo pipefail
RUN=${1:-runs/builtin}
SIZES=scripts/builtin_sizes.json
COMMON=(--data shapes --data-size 1000000 --resolution 64 --quiet --workers 0)
mkdir -p "$RUN"

OMP_NUM_THREADS=1 sdtorch train clip "$SIZES" "${COMMON[@]}" --out "$RUN/clip" --steps 400 --batch-size 128 \
    --lr 5e-4 --warmup-steps 40 --projection-dim 64 --eval-every 200 --sample-every 400 > "$RUN/clip.out" 2>&1 &
OMP_NUM_THREADS=1 sdtorch train vae "$SIZES" "${COMMON[@]}" --out "$RUN/vae" --steps 1200 --batch-size 16 \
    --lr 4e-4 --warmup-steps 50 --eval-every 400 --sample-every 400 > "$RUN/vae.out" 2>&1 &
wait %1 && wait %2

sdtorch train unet "$SIZES" "${COMMON[@]}" --out "$RUN/unet" --steps 2000 --batch-size 64 --lr 3e-4 \
    --warmup-steps 100 --ema-decay 0.999 --caption-dropout 0.1 --eval-every 500 --sample-every 500 \
    --clip "$RUN/clip/model.safetensors" --vae "$RUN/vae/model.safetensors" > "$RUN/unet.out" 2>&1

sdtorch convert "$RUN/unet/model.safetensors" sdtorch/data/builtin.safetensors --dtype fp16
