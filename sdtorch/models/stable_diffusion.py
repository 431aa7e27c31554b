"""The networks under the original single-file checkpoint's key layout, one layout per family.

`StableDiffusionModels().state_dict()` has exactly the keys of an SD 1.x `.safetensors`/`.ckpt`
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), so loading a
community checkpoint is a prefix split, with no per-key table. SD 2.x and SDXL files keep their OpenCLIP towers under
`cond_stage_model.model.*` / `conditioner.embedders.1.model.*` with OpenCLIP's own names inside; our towers sit at
the same prefixes and checkpoint/openclip_keys.py renames what follows the prefix.
"""
from torch import nn

from ..config import ModelConfig
from .clip import CLIPTextModel
from .unet import UNet
from .vae import AutoencoderKL

# part name -> key prefix in the original SD 1.x checkpoint
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# family -> (key prefix, OpenCLIP naming?) of each text encoder, in the order their outputs are concatenated
TEXT_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.text_model.", False),),
    "sd2": (("cond_stage_model.model.", True),),
    "sdxl": (("conditioner.embedders.0.transformer.text_model.", False), ("conditioner.embedders.1.model.", True)),
    "sdxl_refiner": (("conditioner.embedders.0.model.", True),),
}


def text_encoder_prefixes(family: str) -> tuple[tuple[str, bool], ...]:
    if family not in TEXT_ENCODERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[family]


class StableDiffusionModels(nn.Module):
    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.diffusion_model = UNet(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        clips = (cfg.clip,) if cfg.clip_2 is None else (cfg.clip, cfg.clip_2)
        prefixes = text_encoder_prefixes(cfg.family)
        if len(prefixes) != len(clips):
            raise ValueError(f"a {cfg.family} model has {len(prefixes)} text encoder(s), the config {len(clips)}")
        self._text_encoder_paths = []
        for (prefix, _), clip in zip(prefixes, clips, strict=True):
            *parents, name = prefix.rstrip(".").split(".")
            parent = self
            for part in parents:  # the nested modules of the file's key path, e.g. conditioner.embedders.0
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name, CLIPTextModel(clip))
            self._text_encoder_paths.append(prefix.rstrip("."))

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        """The family's text encoders in the order their outputs are concatenated (SDXL: ViT-L, then ViT-bigG)."""
        return [self.get_submodule(path) for path in self._text_encoder_paths]

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder; for SDXL the module holding both (moving or freeing it moves or frees both)."""
        return self.text_encoders[0] if len(self._text_encoder_paths) == 1 else self.conditioner
