"""The methods of the registry (`tdpm_dip.registry`), their inputs and results, and the one dispatch.

blind.py     honest denoisers: only the noisy image and its noise level (observe.py: the 8-bit model)
paper.py     the report's oracle denoising protocol
generate.py  generation: DDPM / DDIM from noise, amortized TDPM, TDPM-DIP (paper protocol)
restore.py   restoration (super-resolution, inpainting): classical, DIP, DDNM, DiffPIR, CCDF, TDPM-DIP
common.py    what they share: batching, chains grouped by level, the memoised DIP fit
shard.py     a job's images split over the processes of `accelerate launch`
dispatch.py  run(ctx, task, protocol, method, job): the registry's lookup, on one process or several;
             run_native: blind denoising at the images' own size, large ones in tiles (tiles.py);
             run_restore: restoration at the images' own sizes
"""

from .dispatch import run, run_native, run_restore
from .types import Context, Job, Result

__all__ = ["Context", "Job", "Result", "run", "run_native", "run_restore"]
