"""The one table of defaults. The CLI's options, the bench, the demo, the app and the Python API read them here.

Plain data, no torch: `tdpm-dip --help` renders them without loading a network library. The report's
settings (Sec. 4 and anchors.md) are the defaults wherever the report fixes one.
"""

from __future__ import annotations

# ------------------------------------------------------------------ the report's protocol (paper)
T_NOISY = 600  # paper denoising: level of the noisy image x_{t_noisy} (the report's t = 600)
T_TRUNC = 10  # TDPM-DIP's truncation level T_trunc (the report's Table 2)
T_TRUNCS = (0, 5, 10, 50)  # Table 3's ablation
N_IMAGES = 200  # the report's test set size (bench)
DDPM_STEPS = 1000  # generation from pure noise: all T steps

# ------------------------------------------------------------------ blind denoising
SIGMA = 25.0  # noise std on the 0..255 scale when noise is added here (bench, demo, --clean)
SAMPLES = 4  # reverse chains (posterior samples) averaged per image: blind ddpm and tdpm-dip
BLIND_DDIM_STEPS = 10  # blind ddim: network evaluations from t*
# blind ensemble: all 8 symmetries up to this many pixels; a larger image averages over fewer, so that it costs about
# what 8 calls cost at 256 x 256 (a 512 x 512 photo: 2)
ENSEMBLE_FULL_PIXELS = 256 * 256
# the largest image `denoise` takes unless told otherwise (--max-megapixels): 16 Mpx, a 4096 x 4096 photo, about 20 min
# per network call on one CPU core in tiles
MAX_PIXELS = 16_000_000
NOISE_MODEL = "clipped"  # what a saved noisy file holds: rounded and clipped to 8 bits
# noise added here (--noise): clipped = a saved 8-bit file; float = the unclipped x + n of denoising papers
NOISE_MODELS = ("clipped", "float")
DENOISE_PROTOCOL = "blind"  # `denoise`: only the noisy image is used (paper: the report's oracle)

# ------------------------------------------------------------------ restoration (super-resolution, inpainting)
RESTORE_T_TRUNC = 200  # ccdf / tdpm-dip: the level the start estimate is diffused to
RESTORE_NET_T_TRUNC = 100  # ccdf-net: its start is closer to x0, so a lower level suffices (CCDF's point)
RESTORE_STEPS = 10  # ccdf / tdpm-dip: network calls per chain from there
RESTORE_SAMPLES = 4  # chains averaged per image (the posterior mean, which PSNR rewards)
RESTORE_ZETA = 1.0  # ccdf / tdpm-dip: DiffPIR's share of fresh noise per step (1: annealed denoising)
RESTORE_FULL_STEPS = 100  # ddnm / diffpir: network calls per chain from pure noise
DDNM_ETA = 0.85  # DDNM's DDIM eta
DIFFPIR_ZETA = 0.25  # DiffPIR's zeta (its super-resolution setting)
# DiffPIR's lambda: rho_t = lambda sigma_y^2 / sigma_t^2 (noisy observations); chosen on training images
RESTORE_LAMBDA = 0.3
SR_SCALES = (2, 4)  # super-resolution factors offered (the shipped model's prior was measured at these)
SR_SCALE = 4  # the default factor
MASK_KIND = "box"  # inpainting masks made here (--mask-kind): box, half or random:P
RESTORE_MAX_PIXELS = 512 * 512  # restore: the largest output refused without --max-pixels (the cost grows with it)
RESTORE_DIP_SEED = 7_368_787  # seed offset of the restoration DIP's input z (independent of the chains' noise)

# ------------------------------------------------------------------ the app: what one request may cost
APP_MAX_SIDE = 1024  # px on the long side of the image denoised (larger uploads are downscaled)
APP_MAX_PIXELS = 512 * 512  # pixels of the image denoised (larger uploads are downscaled): 27-33 s, the default method
APP_MAX_UPLOAD_PIXELS = 16_000_000  # larger uploads are refused from their header, before any pixel is decoded
APP_MAX_SECONDS = 120  # a request stops after this (checked between tiles)
APP_QUEUE_SIZE = 8  # requests waiting at most (one computes at a time)
APP_RESTORE_MAX_PIXELS = 256 * 256  # pixels of an upscaled or inpainted result (larger requests are refused)
APP_HOST = "127.0.0.1"  # this machine only (0.0.0.0 opens the app to the network)
APP_PORT = 7860

# ------------------------------------------------------------------ generation
N_GENERATE = 16  # images per `generate`
# The most images one `generate` makes: they are held in memory until the run is written (about 0.5 GB at 64 px).
# More come from several runs: image i uses seed SEED + i, so --seed 10000 --n 10000 continues --seed 0 --n 10000.
MAX_GENERATE = 10_000
GENERATE_DDIM_STEPS = 110  # generate --method ddim: TDPM-DIP's network evaluations (100 DIP it + T_trunc)
QUICK_DDIM_STEPS = 50  # a short DDIM chain from pure noise: the app's Generate tab, the demo's row of its own DDPM

# ------------------------------------------------------------------ bench
BENCH_TABLES = ("table1", "table2", "table3", "table4")  # the report's tables (bench all: every one)
BENCH_PROTOCOL = "paper"  # the report's tables are the paper protocol's
BENCH_DIP_PRESET = "paper-dip"  # the report's DIP, on any device (shrink it for CPU runs)
BENCH_FIG_IMAGES = 4  # images (columns) in the figures; the report's Fig. 3 fits this many

# ------------------------------------------------------------------ the demo: minutes on two CPU cores
DEMO_N = 8  # test images denoised, and images generated
DEMO_STEPS = 200  # training steps of the small DDPM (Algorithm 1)
DEMO_TRAIN_BATCH = 16  # its batch
DEMO_PRESET = "demo"  # its UNet preset (config.PRESETS)
DEMO_TRAIN_IMAGES = 256  # procedural sprites in its training set
DEMO_SIZE = 32  # image side when training (a given model fixes its own; the embedded default is 32 px)
DEMO_DIP_PRESET = "dip-tiny"
DEMO_BLIND_DIP_ITERS = 200  # the blind DIP's iterations (and the blind TDPM-DIP's plug-in fit)

# ------------------------------------------------------------------ compute
BATCH_SIZE = 16  # images processed (and DIPs fitted) at once
# autocast dtype of the networks (--dtype): auto = bf16 where the device computes it natively, else fp32
DTYPES = ("auto", "fp32", "bf16", "fp16")

# ------------------------------------------------------------------ Algorithm 2 (the DIP)
# The DIP networks G_psi (config.PRESETS), smallest first; paper-dip is the report's (61.5M).
DIP_PRESETS = ("dip-tiny", "dip-small", "paper-dip-noattn", "paper-dip")
# Per use (protocol) and, where a preset needs its own, per preset; `dip.dip_defaults` builds a DIPConfig.
#   paper   the report's Algorithm 2: Adam lr 1e-4, 100 iterations, the last output.
#   blind   G_psi(z) fitted to the noisy y: a larger step, input noise as strong as the input itself
#           (Ulyanov et al. perturb theirs by a third) and an exponential average of the outputs, which
#           keep the full-resolution skip connections of a UNet from fitting the noise.
#   plugin  the blind TDPM-DIP: G_psi(z) fitted to x_T built from the blind estimate and z (Alg. 2 with
#           the oracle replaced); the target is almost noise-free, so no input noise and no averaging.
# The tiny presets move too little at the report's lr in 100 iterations and fit noise at 1e-3 less
# than the larger ones, so they get their own rates.
DIP: dict[str, dict] = {
    "paper": {"iters": 100, "lr": 1e-4},
    "blind": {"iters": 400, "lr": 1e-3, "input_noise": 1.0, "average": 0.95},
    "plugin": {"iters": 200, "lr": 1e-3},
    "restore": {"iters": 300, "lr": 1e-3, "input_noise": 1.0, "average": 0.95},
}
DIP_PRESET_OVERRIDES: dict[tuple[str, str], dict] = {
    ("paper", "dip-tiny"): {"lr": 1e-3},
    ("blind", "dip-tiny"): {"lr": 3e-3},
    ("restore", "dip-tiny"): {"lr": 3e-3},
}
