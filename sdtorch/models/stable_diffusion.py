"""The three networks under the original single-file checkpoint's key layout.

`StableDiffusionModels().state_dict()` has exactly the keys of an SD 1.x `.safetensors`/`.ckpt`
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), so loading a
community checkpoint is a prefix split, with no per-key table.
"""
from torch import nn

from ..config import ModelConfig
from .clip import CLIPTextModel
from .unet import UNet
from .vae import AutoencoderKL

# part name -> key prefix in the original checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}


class StableDiffusionModels(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.diffusion_model = UNet(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = nn.Module()
        self.cond_stage_model.transformer = nn.Module()
        self.cond_stage_model.transformer.text_model = CLIPTextModel(cfg.clip)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextModel:
        return self.cond_stage_model.transformer.text_model
