"""The built-in model ships with the package, loads like any checkpoint and makes a finite image quickly."""
import numpy as np
import torch

import sdtorch
from sdtorch.cli import BUILTIN_MODEL


def test_builtin_model_is_shipped_small_and_loads():
    assert BUILTIN_MODEL.is_file(), "sdtorch/data/builtin.safetensors is missing"
    assert BUILTIN_MODEL.stat().st_size <= 25 * 1024 * 1024
    pipe = sdtorch.load(BUILTIN_MODEL, device="cpu")
    assert pipe.config.resolution == 64 and pipe.config.vae.downsample_factor == 8
    assert pipe.config.unet.in_channels == pipe.config.vae.embed_dim == 4


@torch.no_grad()
def test_builtin_model_generates_a_finite_image():
    pipe = sdtorch.load(BUILTIN_MODEL, device="cpu")
    pixels = pipe.run(sdtorch.pipeline.Settings("a large red circle in the center on a blue background", steps=4,
                                                 cfg=5, sampler="DPM++ 2M", seed=0))
    assert pixels.shape == (1, 3, 64, 64) and torch.isfinite(pixels).all()
    image = np.asarray(pipe.txt2img("a small green square on a white background", steps=4, seed=1)[0])
    assert image.shape == (64, 64, 3) and image.std() > 1  # not a blank image
