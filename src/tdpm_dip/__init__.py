"""tdpm-dip: Truncated Diffusion with a Deep Image Prior.

Layout (one concern per module):
  config    typed presets for the report's UNets and small CPU ones
  data      image folder / hub dataset / procedural sprites -> [-1, 1] tensors
  models    build a UNet2DModel from a preset; load any diffusers DDPM
  noise     schedules, the report's noise-level convention, sigma <-> t
  dip       Algorithm 2: fit G_psi, one image or a batch at once
  sampling  Algorithm 3 and the full DDPM / DDIM reverse chains
  tasks     generation and denoising under the paper and blind protocols
  train     Algorithm 1
  metrics   PSNR, SSIM, FID, SWD, copy-rate, timing
  bench     the report's tables
  cli       the `tdpm-dip` command
"""

__version__ = "0.1.0"
