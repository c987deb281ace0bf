#!/usr/bin/env bash
# Rebuild the embedded default models shipped in src/tdpm_dip/weights/ with the project's own commands.
#
#   bash recipes/embedded_default.sh [WORK_DIR]      (default WORK_DIR: runs/embedded)
#
# Everything is seeded, and training runs on one CPU thread so that the float arithmetic is ordered
# the same way every time. Measured cost: see "The embedded default" in README.md.
set -euo pipefail
WORK=${1:-runs/embedded}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
mkdir -p "$WORK"

# 1. Data: 4096 training sprites (seed 0) and 512 held-out sprites (seed 1, never trained on), 32 px.
tdpm-dip sprites --n 4096 --size 32 --seed 0 --out "$WORK/data/train" --overwrite
tdpm-dip sprites --n 512 --size 32 --seed 1 --out "$WORK/data/test" --overwrite

# 2. Algorithm 1: the DDPM (preset "demo": 0.69M parameters, linear schedule, T = 1000).
tdpm-dip train --data "$WORK/data/train" --out "$WORK/ddpm" --preset demo --size 32 --steps 2500 \
  --batch-size 32 --lr 2e-3 --warmup-steps 100 --checkpoint-every 250 --sample-every 500 --n-samples 16 \
  --seed 0 --overwrite

# 3. Ship it: fp16 safetensors into the package; prints the SHA-256 values for tdpm_dip/embedded.py.
python -m tdpm_dip.embedded export-ddpm "$WORK/ddpm/model"

# 4. Amortized TDPM's generator G_psi for the shipped (fp16) DDPM at T_trunc = 10 (preset generator-small,
#    non-saturating GAN + R1 against the training sprites noised to level 10), then its fp16 copy.
SHIPPED=$(python -c 'from tdpm_dip.embedded import default_ddpm; print(default_ddpm())')
tdpm-dip train-generator --model "$SHIPPED" --data "$WORK/data/train" --t-trunc 10 --out "$WORK/gen-t10" \
  --steps 1500 --batch-size 32 --disc-channels 32 --checkpoint-every 250 --sample-every 250 --seed 0 --overwrite
python -m tdpm_dip.embedded export-generator "$WORK/gen-t10/generator"
