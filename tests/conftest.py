"""Shared fixtures: a tiny SD-1.x-shaped model with random weights (fast on a CPU), and its diffusers twin; a tiny
SDXL model, its single file and its diffusers folder."""
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


def tiny_pipeline(**kwargs):
    """A Pipeline of `tiny_models()` with the default tokenizer, on the CPU."""
    from sdtorch.pipeline import Pipeline
    from sdtorch.tokenizer import CLIPTokenizer

    return Pipeline(tiny_models(), CLIPTokenizer.default(), TINY, **{"device": "cpu", **kwargs})


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


# SDXL's topology at small widths: three levels, no attention at the first, 1 and 2 transformer blocks below it,
# 64-wide heads; ViT-L (64 wide, quick GELU) and bigG (128 wide, GELU, projection) whose penultimate layers make a
# 192-wide context; y = bigG's 128-wide pooled text + 6·256 size numbers; the VAE's scale is SDXL's
TINY_SDXL = ModelConfig(
    family="sdxl", resolution=1024,
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(4, 2), num_head_channels=64,
                    transformer_depth=(0, 1, 2), context_dim=192, use_linear_in_transformer=True,
                    adm_in_channels=128 + 6 * 256),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, scale_factor=0.13025),
    clip=CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1),
    clip_2=CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                          hidden_act="gelu", projection_dim=128))


@pytest.fixture(scope="module")
def sdxl_models():
    from sdtorch.models import StableDiffusionModels

    return randomize_(StableDiffusionModels(TINY_SDXL), seed=7).eval()


@pytest.fixture(scope="module")
def sdxl_file(sdxl_models, tmp_path_factory):
    from sdtorch.checkpoint import save_checkpoint

    return save_checkpoint(sdxl_models, tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors")


@pytest.fixture(scope="module")
def sdxl_folder(sdxl_file, tmp_path_factory):
    from sdtorch.checkpoint import convert

    return convert(sdxl_file, tmp_path_factory.mktemp("sdxldir") / "folder", to_diffusers=True)
