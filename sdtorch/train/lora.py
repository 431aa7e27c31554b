"""Training a LoRA (Hu et al. 2021) for a frozen model, and writing it as kohya-ss's sd-scripts write theirs.

Beside each chosen layer W sits a trainable pair: down (rank x in), started at random, and up (out x rank), started
at zero, so training starts from the model itself. The layer's output becomes

    W x + up(down(x)) · alpha / rank                 (eq. 3 of the paper; alpha/rank as kohya and A1111 scale it)

The layers are kohya's defaults for `networks.lora`: in the UNet every Linear and 1x1 Conv2d of the transformer
blocks (attention, feed-forward, proj_in/proj_out), in the text encoder (with --text-encoder) the attention and MLP
Linears. The file holds `lora_unet_<diffusers name>.lora_down.weight`, `.lora_up.weight` and `.alpha` per layer and
the `ss_*` header entries kohya writes, so A1111, ComfyUI and diffusers load it (and `sdtorch.lora` merges it).
"""
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.diffusers_keys import to_diffusers, unet_rules
from ..checkpoint.formats import write_safetensors
from ..models import StableDiffusionModels
from .objectives import UNetObjective


class LoraLayer(nn.Module):
    """The trainable low-rank pair beside a frozen Linear or 1x1 Conv2d; `hook` adds its term to the layer's output."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(layer.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear's own init, and kohya's
        nn.init.zeros_(self.lora_up.weight)  # ΔW = 0 at the start
        self.scale = alpha / rank

    def hook(self, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return out + self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))).to(out.dtype) * self.scale


def kohya_targets(models: StableDiffusionModels, text_encoder: bool) -> dict[str, nn.Module]:
    """kohya key -> layer, for kohya's default LoRA targets (see the module's text)."""
    rules = unet_rules(models.unet.config)
    targets = {}
    for name, module in models.unet.named_modules():
        in_transformer = ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))
        if in_transformer and (isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d)
                               and module.kernel_size == (1, 1)):
            diffusers = to_diffusers(name + ".weight", rules).removesuffix(".weight")
            targets["lora_unet_" + diffusers.replace(".", "_")] = module
    if text_encoder:
        for name, module in models.text_encoder.named_modules():
            if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
                targets["lora_te_text_model_" + name.replace(".", "_")] = module
    return targets


class LoraObjective(UNetObjective):
    """The UNet's denoising loss with every model weight frozen: only the LoRA pairs learn. Checkpoints hold the pairs
    alone (a few MB, not the model), and `export` writes the kohya file."""

    def __init__(self, models: StableDiffusionModels, empty_ids: torch.Tensor, rank: int, alpha: float,
                 text_encoder: bool = False, **kwargs):
        if rank < 1 or alpha <= 0:
            raise ValueError(f"--rank must be >= 1 and --alpha > 0, got {rank} and {alpha}")
        super().__init__(models, empty_ids, train_text_encoder=text_encoder, **kwargs)  # context() with gradients
        models.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.lora = nn.ModuleDict()
        for key, layer in kohya_targets(models, text_encoder).items():
            self.lora[key] = LoraLayer(layer, rank, alpha)
            layer.register_forward_hook(self.lora[key].hook)
        self.metadata: dict[str, str] = {}  # kohya's ss_* entries the trainer knows (see train/cli.py)

    def state_dict(self, *args, **kwargs) -> dict:
        return {"lora." + k: v for k, v in self.lora.state_dict().items()}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        return self.lora.load_state_dict({k.removeprefix("lora."): v for k, v in state.items()}, strict=strict)

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, layer in self.lora.items():
            tensors[f"{key}.lora_down.weight"] = layer.lora_down.weight.detach().float().cpu().contiguous()
            tensors[f"{key}.lora_up.weight"] = layer.lora_up.weight.detach().float().cpu().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(self.alpha))
        return tensors

    def export(self, path) -> None:
        """The kohya-format LoRA file, with the ss_* metadata A1111 shows and reads (ss_network_dim/alpha, ...)."""
        family = self.models.config.family
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                    "ss_network_alpha": str(float(self.alpha)), "ss_v2": str(family == "sd2"),
                    "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2"}.get(family, family),
                    "ss_network_train_unet_only": str(not self.train_text_encoder),
                    "ss_network_train_text_encoder_only": "False",
                    "ss_training_finished_at": str(time.time()), "ss_output_name": Path(path).stem,
                    "ss_network_args": json.dumps({}), **self.metadata}
        write_safetensors(self.kohya_tensors(), Path(path), metadata)
