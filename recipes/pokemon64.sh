#!/usr/bin/env bash
# The 64 px Pokemon DDPMs: the data, the reference DDPMs (GPU) and the shipped denoiser (CPU), with the
# project's own commands.
#
#   bash recipes/pokemon64.sh ARTWORK_DIR [WORK_DIR]      (default WORK_DIR: runs/pokemon64)
#
# ARTWORK_DIR: the 800 Pokemon species artworks, one file per species named by it (abra.jpg, ...): the split
# below is then the one every Pokemon figure of docs/results.md uses. Any folder of named images works.
set -euo pipefail
ART=${1:?usage: bash recipes/pokemon64.sh ARTWORK_DIR [WORK_DIR]}
WORK=${2:-runs/pokemon64}
export HF_HUB_OFFLINE=1
mkdir -p "$WORK"

# 1. Data: 600 training and 200 test images, split by a hash of each name (deterministic; seconds).
tdpm-dip prepare-data --source "$ART" --test 200 --out "$WORK/data" --overwrite

# 2. [GPU] The reference DDPMs: preset "small" (12.5M parameters), 64 px, linear and cosine schedules, batch 128,
#    AdamW lr 2e-4 with 300 warm-up steps, bf16, EMA 0.999, about 1,700 steps (about 7 minutes each on one
#    H100). Short runs: their full-chain samples stay rough; their short chains from small levels denoise well.
for SCHED in linear cosine; do
  tdpm-dip train --data "$WORK/data/train" --out "$WORK/ddpm-$SCHED" --preset small --size 64 --schedule "$SCHED" \
    --steps 1700 --batch-size 128 --lr 2e-4 --warmup-steps 300 --ema-decay 0.999 --mixed-precision bf16 \
    --checkpoint-every 500 --sample-every 500 --seed 0 --overwrite
done

# 3. [CPU, about 2 hours on one core] The shipped denoiser: the linear DDPM fine-tuned on the levels of
#    noisy files (1..200: sigma up to about 90 on 0..255), with the 8 flips and transposes the ensemble
#    uses, bf16 autocast (on CPUs with native bf16; use --mixed-precision no elsewhere).
tdpm-dip train --init "$WORK/ddpm-linear/model" --data "$WORK/data/train" --out "$WORK/denoiser" \
  --size 64 --steps 2000 --batch-size 16 --lr 1e-4 --warmup-steps 100 --t-max 200 --augment d4 \
  --mixed-precision bf16 --checkpoint-every 250 --keep-checkpoints 2 --sample-every 0 --n-samples 0 \
  --seed 0 --overwrite

# 4. [CPU, about 45 minutes on one core] A second, shorter fine-tune on levels 16..160 (sigma 8 to 71), at half
#    the learning rate and another seed: +0.05 to +0.08 dB on held-out files (docs/results.md, the shipped denoiser).
tdpm-dip train --init "$WORK/denoiser/model" --data "$WORK/data/train" --out "$WORK/denoiser-2" \
  --size 64 --steps 600 --batch-size 16 --lr 5e-5 --warmup-steps 30 --t-min 16 --t-max 160 --augment d4 \
  --mixed-precision bf16 --checkpoint-every 250 --keep-checkpoints 2 --sample-every 0 --n-samples 0 \
  --seed 1 --overwrite

# 5. Ship it: fp16 safetensors into the package; prints the SHA-256 values for tdpm_dip/embedded.py.
python -m tdpm_dip.embedded export-ddpm "$WORK/denoiser-2/model" --name ddpm-pokemon64

# 6. [CPU, about 55 minutes on one core] The restoration network beside it (restore's ccdf-net and net): a UNet of
#    2.5M parameters (32, 64, 128 channels, no attention) trained on the first 540 training images, degraded
#    here (bicubic x2 / x4 and masks, a third with noise), 2,400 steps at batch 16; the other 60 chose the
#    restoration defaults. Then into the package as the shipped DDPM's restorer/.
tdpm-dip train-restorer --data "$WORK/data/train" --limit 540 --out "$WORK/restorer" --steps 2400 --repeats 6 \
  --seed 0 --threads 1
python -m tdpm_dip.embedded export-restorer "$WORK/restorer" --name ddpm-pokemon64
