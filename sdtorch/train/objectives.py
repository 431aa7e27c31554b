"""The three training objectives, each an `nn.Module` the engine can wrap in DistributedDataParallel.

Each takes a batch from `data.Collate` (image (B, 3, H, W) in [-1, 1], caption, seed (B,), ids (B, L)) and returns
(loss to backpropagate, metrics to log). All their randomness (noise, timesteps, posterior samples) is drawn from the
batch's per-sample seeds, so a resumed or sharded run draws exactly what the uninterrupted single-process run draws.
Each also has `evaluate(batches)` (held-out metrics), `preview(batch)` (image rows for a PNG grid, or None) and
`export(path)` (the final model as a native single-file checkpoint).
"""
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import save_checkpoint
from ..config import CLIPTextConfig, ModelConfig, VAEConfig
from ..diffusion.guidance import CFGDenoiser
from ..diffusion.noise import SeededNoise
from ..diffusion.sample import sample
from ..diffusion.schedule import DiscreteSchedule
from ..models import AutoencoderKL, CLIPTextModel, StableDiffusionModels
from ..models.stable_diffusion import PREFIXES
from ..models.vae import gaussian_kl
from .checkpoints import atomic_file
from .image_encoder import CLIPVisionConfig, CLIPVisionTransformer

CONFIG_KEY = "sdtorch.config"  # the safetensors header entry holding the ModelConfig as JSON


def save_parts(path: str | Path, config: ModelConfig, parts: dict[str, nn.Module]) -> None:
    """Write `parts` ("unet", "vae", "text_encoder") under the original checkpoint's key prefixes, with `config` in
    the header, as one .safetensors file (written atomically)."""
    from safetensors.torch import save

    tensors = {PREFIXES[name] + key: value.detach().cpu().contiguous()
               for name, module in parts.items() for key, value in module.state_dict().items()}
    with atomic_file(path) as f:
        f.write(save(tensors, metadata={CONFIG_KEY: json.dumps(config.to_dict())}))


def load_parts(path: str | Path) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """(config, {part: state dict}) of a native .safetensors checkpoint; a file without our header entry is read as
    SD 1.x (a community checkpoint to fine-tune). Read by the checkpoint loader's checked readers, the stored config
    checked for types and bounds."""
    from contextlib import ExitStack

    from ..checkpoint.formats import detect_format, read_tensor_file
    from ..checkpoint.validate import check_config

    path = Path(path)
    with ExitStack() as files:
        refs, metadata = read_tensor_file(path, detect_format(path), files)
        tensors = {key: ref.load(None, torch.device("cpu")).clone() for key, ref in refs.items()}
    header = metadata.get(CONFIG_KEY)
    try:
        config = ModelConfig.from_dict(json.loads(header)) if header else ModelConfig()
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable {CONFIG_KEY} metadata ({e})") from None
    check_config(config, str(path))
    parts = {name: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
             for name, prefix in PREFIXES.items()}
    return config, {name: state for name, state in parts.items() if state}


def seeded_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample: its draws depend on that sample's seed alone, not on the batch around it."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]


def seeded_randn(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(B, *shape) standard normal noise, row b from generators[b], drawn on the CPU (the same on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def posterior_moments(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the VAE posterior q(z|x): what EncodingCache keeps for a frozen encoder."""
    posterior = vae.encode(images)
    return posterior.mean, posterior.logvar


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, noise_scale: float, generators: list[torch.Generator],
                   device: torch.device) -> torch.Tensor:
    """z = mean + noise_scale·std·ε, ε from each sample's generator (the reparameterization, Kingma & Welling 2014;
    noise_scale 1 is q(z|x) itself, 0 its mean: the VAE's and its UNets' --latent-noise)."""
    eps = seeded_randn(generators, tuple(mean.shape[1:]), device)
    return mean + noise_scale * torch.exp(0.5 * logvar) * eps.to(mean.dtype)


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along the batch whose backward sums the gradient every rank computed for this rank's rows, so a
    loss over the gathered batch has the gradient it would have if one process held the whole batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.world = rank, world
        return torch.cat(parts)  # (b, D) -> (world·b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every row; all_reduce works on any backend
        return grad.chunk(ctx.world)[ctx.rank]


def edge_map(images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """(B, 1, H, W): 1.0 where a pixel's 3x3 neighbourhood spans more than `threshold` in some channel, else 0.0.
    That marks the pixel on each side of every edge: a shape's outline, which a mean over flat colours hardly weighs."""
    spread = F.max_pool2d(images, 3, stride=1, padding=1) + F.max_pool2d(-images, 3, stride=1, padding=1)  # max - min
    return (spread.amax(1, keepdim=True) > threshold).to(images.dtype)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, of images in [-1, 1] (peak 1 after mapping to [0, 1])."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


class EncodingCache:
    """Memo of a frozen encoder's outputs, keyed by the bytes of each input row: a UNet run over a fixed pool of
    images and captions sees each of them once per epoch, and the frozen VAE and text encoder would otherwise redo the
    same work every time (on 64x64 shapes the VAE encoder costs as much as the UNet's forward and backward).
    `encode(inputs) -> tuple of (B, ...) tensors`; at most `max_items` rows are kept (later ones are computed anew)."""

    def __init__(self, encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], max_items: int):
        if max_items < 1:
            raise ValueError(f"the cache needs room for at least one item, got {max_items}")
        self.encode, self.max_items, self.store = encode, max_items, {}
        self.hits = self.misses = 0

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = inputs.detach().cpu().contiguous()
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in rows]
        fresh = {}
        todo = [i for i, key in enumerate(keys) if key not in self.store]
        if todo:
            outputs = self.encode(inputs[todo])
            for j, i in enumerate(todo):
                fresh[keys[i]] = tuple(out[j].clone() for out in outputs)
                if len(self.store) < self.max_items:
                    self.store[keys[i]] = fresh[keys[i]]
        self.hits, self.misses = self.hits + len(keys) - len(todo), self.misses + len(todo)
        rows_out = [self.store.get(key) or fresh[key] for key in keys]
        return tuple(torch.stack(parts) for parts in zip(*rows_out, strict=True))


# ---- CLIP ------------------------------------------------------------------------------------------------------------

class CLIPObjective(nn.Module):
    """Contrastive language-image pre-training (Radford et al. 2021, Figure 3): symmetric InfoNCE over the batch's
    image-text similarity matrix with a learned temperature. Attribute names follow transformers' `CLIPModel`."""

    def __init__(self, text: CLIPTextConfig, vision: CLIPVisionConfig, projection_dim: int = 128):
        super().__init__()
        self.text_model = CLIPTextModel(text)
        self.vision_model = CLIPVisionTransformer(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.text_projection = nn.Linear(text.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature, 0.07

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, P) unit vectors: the final-LN hidden state at the EOS token, projected. EOS has the
        highest id in CLIP's vocabulary, so argmax finds it (the first one, when padding is EOS too), as CLIP does.
        (The UNet later reads the whole (B, L, D) sequence, not this one vector.)"""
        hidden = self.text_model(ids)  # (B, L, D)
        pooled = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]  # (B, D)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_projection(self.vision_model(images)), dim=-1)  # (B, 3, S, S) -> (B, P)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images, texts = self.embed_images(batch["image"]), self.embed_text(batch["ids"])
        if _world()[1] > 1:
            # the negatives are the whole global batch, as in CLIP (and as one process would see it)
            images, texts = _GatherWithGrad.apply(images), _GatherWithGrad.apply(texts)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP clips the logit scale at 100
        logits = scale * images @ texts.T  # (N, N): image i against text j
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return loss, {"loss": loss.detach(), "temperature": 1 / scale.detach()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict:
        """Text->image top-1 retrieval over the held-out set: a hit when the best image's caption is the query's
        (images with identical captions cannot be told apart by the text). `chance` is a random guess's rate."""
        images, texts, captions = [], [], []
        for batch in batches:
            images.append(self.embed_images(batch["image"]))
            texts.append(self.embed_text(batch["ids"]))
            captions += batch["caption"]
        best = (torch.cat(texts) @ torch.cat(images).T).argmax(dim=1).tolist()  # (N texts, N images) -> (N,)
        hits = sum(captions[j] == captions[i] for i, j in enumerate(best))
        chance = sum(captions.count(c) for c in captions) / len(captions) ** 2
        return {"retrieval_top1": hits / len(captions), "chance": chance}

    def preview(self, batch: dict) -> None:
        return None

    def export(self, path) -> None:
        """The text encoder alone, as SD loads it (the image tower and projections only serve training)."""
        save_parts(path, ModelConfig(clip=self.text_model.config), {"text_encoder": self.text_model})


# ---- VAE -------------------------------------------------------------------------------------------------------------

class VAEObjective(nn.Module):
    """Reconstruction + β·KL (Kingma & Welling 2014; Rombach et al. 2022, sec. 3 without the GAN and LPIPS terms).

    decoder_only: the encoder is frozen and only the decoder learns (as Stability fine-tuned SD's ft-MSE VAE), so the
    latent space, and every UNet trained on it, stays valid; the KL term is then a constant and is only logged.
    cache_items > 0 (decoder_only): remember the frozen encoder's posterior per image (see EncodingCache).
    latent_noise: z = mean + latent_noise·std·ε. 1 is the VAE's sample (SD); 0 decodes the posterior mean, an
    autoencoder with no noise, in which no latent channel can drown in noise and be given up by the decoder
    (posterior collapse). A UNet must then be trained on the same latents (`UNetObjective(latent_noise=0)`).
    edge_weight: pixels near an edge (`edge_map`) weigh 1 + edge_weight in the reconstruction, others 1 (the
    weighted mean is normalised by the weights); small shapes are mostly outline, and their kind lives there.
    """

    def __init__(self, cfg: VAEConfig, reconstruction: str = "l1", kl_weight: float = 1e-6,
                 decoder_only: bool = False, cache_items: int = 0, latent_noise: float = 1.0,
                 edge_weight: float = 0.0):
        super().__init__()
        if reconstruction not in ("l1", "mse"):
            raise ValueError(f"reconstruction loss must be 'l1' or 'mse', got {reconstruction!r}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be non-negative, got {kl_weight}")
        if latent_noise < 0:
            raise ValueError(f"latent_noise must be non-negative, got {latent_noise}")
        if edge_weight < 0:
            raise ValueError(f"edge_weight must be non-negative, got {edge_weight}")
        if cache_items and not decoder_only:
            raise ValueError("only a frozen encoder's outputs can be cached: use cache_items with decoder_only")
        self.vae = AutoencoderKL(cfg)
        self.reconstruction, self.kl_weight, self.decoder_only = reconstruction, kl_weight, decoder_only
        self.latent_noise, self.edge_weight = latent_noise, edge_weight
        self.scale_factor = cfg.scale_factor  # replaced by 1/std of the held-out latents at each evaluation
        if decoder_only:
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        encode = functools.partial(posterior_moments, self.vae)
        self.cache = EncodingCache(encode, cache_items) if cache_items else None

    def _latents(self, images: torch.Tensor, seeds: torch.Tensor):
        """(mean, logvar) of q(z|x) and z ~ q(z|x), reparameterized (its noise scaled by latent_noise)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            mean, logvar = self.cache(images) if self.cache is not None else posterior_moments(self.vae, images)
        z = sample_latents(mean, logvar, self.latent_noise, seeded_generators(seeds), images.device)
        return mean, logvar, z

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        mean, logvar, z = self._latents(images, batch["seed"])
        recon = self.vae.decode(z).float()
        error = (recon - images).abs() if self.reconstruction == "l1" else (recon - images).pow(2)
        if self.edge_weight:
            weight = 1 + self.edge_weight * edge_map(images)  # (B, 1, H, W), broadcast over channels
            rec = (error * weight).sum() / (weight.sum() * images.shape[1])
        else:
            rec = error.mean()
        # LDM sums the reconstruction over pixels and the KL over latent entries, with weight 1e-6; we average the
        # reconstruction per pixel value, so dividing the summed KL by the same count keeps its ratio for that weight.
        kl = gaussian_kl(mean, logvar).float().mean() / images[0].numel()
        loss = rec + self.kl_weight * kl
        return loss, {"loss": loss.detach(), "reconstruction": rec.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict:
        """PSNR of held-out reconstructions (from the posterior mean), and the latent scale factor: 1/std of sampled
        latents, the rule behind SD's 0.18215 (Rombach et al. 2022, sec. 4.3.2), so the UNet sees ~unit variance."""
        psnr, latents = [], []
        for batch in batches:
            mean, _, z = self._latents(batch["image"], batch["seed"])
            psnr.append(_psnr(self.vae.decode(mean).float(), batch["image"]))
            latents.append(z.float().flatten())
        std = torch.cat(latents).std().item()
        if not self.decoder_only:  # a frozen encoder keeps the scale its UNets were trained with
            self.scale_factor = 1.0 / std
        return {"psnr": torch.cat(psnr).mean().item(), "latent_std": std, "scale_factor": self.scale_factor}

    @torch.no_grad()
    def preview(self, batch: dict, count: int = 8) -> list[torch.Tensor]:
        """Rows: held-out images, their reconstructions."""
        images = batch["image"][:count]
        return [images, self.vae.decode(self.vae.encode(images).mean).float()]

    def export(self, path) -> None:
        cfg = dataclasses.replace(self.vae.config, scale_factor=self.scale_factor)
        save_parts(path, ModelConfig(vae=cfg), {"vae": self.vae})


# ---- UNet ------------------------------------------------------------------------------------------------------------

def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 9): min(SNR, γ) on the x0-loss, written for an ε- or v-loss.
    ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1); at SNR = 0 (zero-terminal-SNR schedules) the ε weight is 1."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def use_gradient_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations during backward instead of keeping them (Chen et al. 2016): less memory
    for ~30% more compute. Patches the instances' forward, so parameter names (and checkpoint keys) don't change."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class UNetObjective(nn.Module):
    """Denoising loss on VAE latents (Ho et al. 2020, Algorithm 1; v-prediction: Salimans & Ho 2022), conditioned on
    a CLIP text encoder, with a uniformly random timestep per sample and optional min-SNR-γ weighting.

    The text encoder is frozen as in SD, unless `train_text_encoder`: then the denoising loss trains it too (as
    DreamBooth's --train_text_encoder does), so its token states learn what the UNet needs from them; a CLIP trained
    only contrastively on the pooled caption leaves each position word's state without its own shape's colour."""

    def __init__(self, models: StableDiffusionModels, empty_ids: torch.Tensor, min_snr_gamma: float | None = None,
                 zero_terminal_snr: bool = False, cache_items: int = 0, latent_noise: float = 1.0,
                 train_text_encoder: bool = False):
        super().__init__()
        cfg = models.config
        if cfg.unet.in_channels != cfg.vae.embed_dim or cfg.unet.context_dim != cfg.clip.hidden_size:
            raise ValueError(f"the UNet (in_channels {cfg.unet.in_channels}, context_dim {cfg.unet.context_dim}) does "
                             f"not fit the VAE (embed_dim {cfg.vae.embed_dim}) and CLIP (width {cfg.clip.hidden_size})")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        if latent_noise < 0:
            raise ValueError(f"latent_noise must be non-negative, got {latent_noise}")
        self.models, self.latent_noise = models, latent_noise  # latent_noise: as the VAE was trained (VAEObjective)
        models.vae.requires_grad_(False)
        models.text_encoder.requires_grad_(train_text_encoder)
        self.train_text_encoder = train_text_encoder
        self.schedule = DiscreteSchedule.scaled_linear(zero_terminal_snr=zero_terminal_snr)
        self.prediction_type, self.min_snr_gamma = cfg.prediction_type, min_snr_gamma
        self.empty_ids = empty_ids  # (1, L) ids of "", the unconditional prompt for guided previews (not a weight)
        # cache_items > 0: remember the frozen encoders' outputs per image and per caption (see EncodingCache)
        self.latent_cache = self.text_cache = None
        if cache_items:
            self.latent_cache = EncodingCache(functools.partial(posterior_moments, models.vae), cache_items)
            if not train_text_encoder:  # a trained encoder's outputs change every step
                self.text_cache = EncodingCache(lambda ids: (self.models.text_encoder(ids),), cache_items)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images, device = batch["image"], batch["image"].device
        generators = seeded_generators(batch["seed"])
        t = torch.cat([torch.randint(self.schedule.num_train_timesteps, (1,), generator=g) for g in generators])
        with torch.no_grad():  # the VAE and the text encoder are frozen
            mean, logvar = (self.latent_cache(images) if self.latent_cache
                            else posterior_moments(self.models.vae, images))
            shape = tuple(mean.shape[1:])
            z = sample_latents(mean, logvar, self.latent_noise, generators, device)
            x0 = z.float() * self.models.config.vae.scale_factor  # (B, 4, h, w) latents of ~unit variance
            noise = seeded_randn(generators, shape, device)
            t = t.to(device)
            x_t = self.schedule.add_noise(x0, noise, t)
            target = self.schedule.training_target(x0, noise, t, self.prediction_type)
        context = self.context(batch["ids"])  # (B, L) -> (B, L, D): the whole sequence, as at inference
        per_sample = (self.models.unet(x_t, t, context).float() - target).pow(2).flatten(1).mean(1)  # (B,)
        if self.min_snr_gamma is not None:
            alpha_bar = self.schedule.alphas_cumprod.to(device)[t]
            per_sample = per_sample * min_snr_weight(alpha_bar / (1 - alpha_bar), self.min_snr_gamma,
                                                     self.prediction_type)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}

    def context(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's output for token ids; with gradients only when it (or a LoRA of it) is trained."""
        if self.train_text_encoder:
            return self.models.text_encoder(ids)
        with torch.no_grad():
            return self.text_cache(ids)[0] if self.text_cache else self.models.text_encoder(ids)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict:
        """The loss on held-out images; their seeds are fixed, so the noise and timesteps are the same every time."""
        total, count = 0.0, 0
        for batch in batches:
            total += self(batch)[0].item() * len(batch["seed"])
            count += len(batch["seed"])
        return {"loss": total / count}

    @torch.no_grad()
    def preview(self, batch: dict, count: int = 8, steps: int = 20, sampler: str = "DPM++ 2M",
                cfg_scale: float = 5.0) -> list[torch.Tensor]:
        """Rows: held-out images, then samples for their captions with seeds 0..count-1 (guided by `cfg_scale`)."""
        ids = batch["ids"][:count]
        n, device = ids.shape[0], ids.device
        cond = self.models.text_encoder(ids)
        uncond = self.models.text_encoder(self.empty_ids.to(device).expand(n, -1))
        latent_side = batch["image"].shape[-1] // self.models.config.vae.downsample_factor
        shape = (self.models.config.unet.out_channels, latent_side, latent_side)
        denoiser = CFGDenoiser(self.models.unet, self.schedule, self.prediction_type)
        # the same generation as the pipeline's: seeds 0..n-1, the sampler's own schedule and scalings
        latents = sample(denoiser, sampler, steps, self.schedule, SeededNoise(0, n), shape, device=device,
                         extra_args={"cond": cond, "uncond": uncond, "cfg_scale": cfg_scale})
        images = self.models.vae.decode(latents / self.models.config.vae.scale_factor).float()
        return [batch["image"][:count], images]

    def export(self, path) -> None:
        """The whole model: this UNet with the frozen text encoder and VAE it was trained with."""
        save_checkpoint(self.models, path)
