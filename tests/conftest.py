"""Shared fixtures: a tiny SD-1.x-shaped model with random weights (fast on a CPU), and its diffusers twin."""
import pytest
import torch

from reference import randomize_
from sdtorch.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig

# Same architecture as SD 1.x (f=8 VAE with 4 latent channels, cross-attention UNet, CLIP text tower), tiny widths.
TINY = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2,
                    context_dim=32),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    clip=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
)


def tiny_models(cfg: ModelConfig = TINY, seed: int = 0):
    from sdtorch.models import StableDiffusionModels

    torch.manual_seed(seed)
    models = StableDiffusionModels(cfg)
    randomize_(models.unet, seed=seed + 1)
    randomize_(models.vae, seed=seed + 2)
    randomize_(models.text_encoder, seed=seed + 3)
    return models.eval()


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return TINY


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' ops are too small to split across threads; on a busy machine two threads wait for each other
    (each call ~10x slower), one keeps a tiny UNet call at ~8 ms. Modules use it with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
