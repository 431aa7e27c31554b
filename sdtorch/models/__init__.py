"""The three networks of Stable Diffusion: CLIP text encoder, VAE and UNet, plus the container that gives them the
original single-file checkpoint's key layout."""
from .clip import CLIPTextModel
from .stable_diffusion import StableDiffusionModels
from .unet import UNet
from .vae import AutoencoderKL

__all__ = ["CLIPTextModel", "AutoencoderKL", "UNet", "StableDiffusionModels"]
