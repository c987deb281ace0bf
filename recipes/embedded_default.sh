#!/usr/bin/env bash
# Rebuild the shipped sprite pair in src/tdpm_dip/weights/ (ddpm-sprites32, tdpm-generator-sprites32) with the
# project's own commands.
#
#   bash recipes/embedded_default.sh [WORK_DIR]      (default WORK_DIR: runs/embedded)
#
# Everything is seeded, and training runs on one CPU thread so that the float arithmetic is ordered
# the same way every time. Measured cost: docs/results.md, "Training cost of the shipped models".
set -euo pipefail
WORK=${1:-runs/embedded}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mkdir -p "$WORK"

# 1. Data: 16384 training sprites (seed 0; the first 4096 are those of `--n 4096`) and 512 held-out sprites
#    (seed 1, never trained on), 32 px.
tdpm-dip sprites --n 16384 --size 32 --seed 0 --out "$WORK/data/train" --overwrite
tdpm-dip sprites --n 512 --size 32 --seed 1 --out "$WORK/data/test" --overwrite

# 2. Algorithm 1, truncated (TDPM): the DDPM (preset "sprites", 2.7M parameters, linear schedule, T = 1000) is
#    trained on noise levels 1..500 only; amortized TDPM starts its chain below that.
tdpm-dip train --data "$WORK/data/train" --out "$WORK/ddpm" --preset sprites --size 32 --t-max 500 --steps 6000 \
  --batch-size 32 --lr 1e-3 --warmup-steps 200 --mixed-precision bf16 --checkpoint-every 500 --sample-every 0 \
  --n-samples 0 --log-every 50 --seed 0 --overwrite

# 3. Ship it: fp16 safetensors into the package; prints the SHA-256 values for tdpm_dip/embedded.py.
python -m tdpm_dip.embedded export-ddpm "$WORK/ddpm/model"
SHIPPED=$(python -c 'from tdpm_dip.embedded import default_ddpm; print(default_ddpm())')

# 4. Amortized TDPM's generator G_psi at T_trunc 400 (preset generator-small; --predict x0: it makes a clean image
#    and the forward noise of level 400 is added, as to the real samples; non-saturating GAN + R1 against the
#    training sprites noised to level 400). Sampling takes 10 posterior steps from level 400 (--reverse-steps):
#    11 network calls per image. The GAN's updates do not read the DDPM (only its sample grids do), so this step
#    may run beside step 2 with any 32 px linear-schedule DDPM as --model; step 5 pairs it with the shipped one.
tdpm-dip train-generator --model "$SHIPPED" --data "$WORK/data/train" --t-trunc 400 --predict x0 \
  --reverse-steps 10 --out "$WORK/gen-t400" --steps 3000 --batch-size 32 --disc-channels 32 \
  --mixed-precision bf16 --checkpoint-every 250 --sample-every 500 --log-every 50 --seed 0 --overwrite

# 5. Ship it: fp16 copy, paired with the shipped DDPM, 10 reverse steps.
python -m tdpm_dip.embedded export-generator "$WORK/gen-t400/generator" --ddpm "$SHIPPED" --reverse-steps 10
