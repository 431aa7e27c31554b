"""`sdtorch train clip|vae|unet ...`: build the objective and the data from flags, then run the engine.

The model sizes start from TINY (the small SD-shaped model that trains on a CPU) and change with a CONFIG file
(`sdtorch train unet CONFIG.json ...`: ModelConfig fields, nested: {"unet": {"model_channels": 96}}; CLIP's image
tower under "vision") and with `--set unet.model_channels=96` (applied last). Under `torchrun --nproc_per_node=N`
the same command trains with DistributedDataParallel; --batch-size is the global batch.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..checkpoint.validate import check_config, check_fields
from ..config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from ..diffusion.schedule import PREDICTION_TYPES
from ..models import StableDiffusionModels
from ..models.stable_diffusion import PREFIXES
from ..tokenizer import CLIPTokenizer
from .data import Collate, TrainItems, TrainTransform, open_source, split_holdout
from .engine import PRECISIONS, TrainConfig, train
from .image_encoder import CLIPVisionConfig
from .objectives import CLIPObjective, UNetObjective, VAEObjective, load_parts, use_gradient_checkpointing
from .lora import LoraObjective
from .shapes import TWO_SHAPES_PROB

TINY = ModelConfig(
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2, 4),
                    num_heads=4, context_dim=128),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, scale_factor=1.0),
    clip=CLIPTextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
)
"""64x64 images -> 8x8x4 latents; CLIP width 128 with 4 layers; a 3-level UNet of width 64. Weights: VAE 3.0 M,
UNet 7.0 M, CLIP text 0.8 M plus 6.3 M token embeddings (CLIP's image tower for contrastive training: 0.8 M)."""

OBJECTIVE_DEFAULTS = {  # flags whose good value depends on what is trained
    "clip": dict(lr=5e-4, caption_dropout=0.0, ema_decay=0.0, weight_decay=0.1),
    "vae": dict(lr=2e-4, caption_dropout=0.0, ema_decay=0.0, weight_decay=0.0),
    "unet": dict(lr=2e-4, caption_dropout=0.1, ema_decay=0.999, weight_decay=0.01),
    "lora": dict(lr=1e-4, caption_dropout=0.0, ema_decay=0.0, weight_decay=0.0),  # kohya's defaults
}


def add_train_parser(subparsers) -> None:
    """Add `train clip|vae|unet|lora` to the `sdtorch` command's subparsers."""
    p = subparsers.add_parser("train", help="train CLIP, the VAE or the UNet (from scratch, or fine-tune)")
    kinds = p.add_subparsers(dest="objective", required=True)
    helps = {"clip": "contrastive text+image training of the text encoder (Radford et al. 2021)",
             "vae": "the autoencoder: reconstruction + KL; also measures the latent scale factor",
             "unet": "the denoiser on VAE latents, conditioned on a frozen text encoder",
             "lora": "a LoRA for a frozen model (--init), written in kohya's format for A1111/ComfyUI/diffusers"}
    for kind, help_text in helps.items():
        k = kinds.add_parser(kind, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_common(k, kind)
        if kind == "clip":
            k.add_argument("--projection-dim", type=int, default=128, help="width of the shared embedding space")
        elif kind == "vae":
            k.add_argument("--loss", choices=["l1", "mse"], default="l1", help="reconstruction loss")
            k.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight, relative to a summed loss")
            k.add_argument("--edge-weight", type=float, default=0.0, metavar="W",
                           help="pixels within one of an edge weigh 1+W in the reconstruction loss (shape outlines)")
            k.add_argument("--init", help="a VAE (or SD checkpoint) whose VAE to fine-tune; its config wins")
            k.add_argument("--decoder-only", action="store_true",
                           help="freeze the encoder: the latent space (and UNets trained on it) stays valid")
            k.add_argument("--cache-encodings", type=int, default=0, metavar="N",
                           help="with --decoder-only: remember the frozen encoder's posterior for up to N images")
            k.add_argument("--latent-noise", type=float, default=1.0, metavar="S",
                           help="decode mean + S·std·noise: 1 samples the posterior (SD), 0 decodes its mean (no "
                                "latent channel lost to noise; then train the UNet with the same --latent-noise)")
        else:
            k.add_argument("--clip", help="text encoder file (from `sdtorch train clip`), frozen")
            k.add_argument("--vae", help="VAE file (from `sdtorch train vae`), frozen")
            k.add_argument("--init", help="an SD checkpoint to fine-tune: its UNet, and its CLIP/VAE unless given")
            k.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                           help="what the UNet predicts (default: the --init model's, else epsilon)")
            k.add_argument("--min-snr-gamma", type=float, help="min-SNR-γ loss weighting (Hang et al. 2023), e.g. 5")
            k.add_argument("--zero-terminal-snr", action="store_true", help="rescale β to zero terminal SNR")
            k.add_argument("--grad-checkpointing", action="store_true", help="recompute activations (less memory)")
            k.add_argument("--cache-encodings", type=int, default=0, metavar="N",
                           help="remember the frozen VAE's and text encoder's outputs for up to N images and N "
                                "captions (about 25 KB each at 64x64): for several epochs over a fixed pool")
            k.add_argument("--latent-noise", type=float, default=1.0, metavar="S",
                           help="latents are mean + S·std·noise of the VAE's posterior: use the VAE's own value")
            if kind == "lora":
                k.add_argument("--rank", type=int, default=16, help="the LoRA's rank (kohya's network_dim)")
                k.add_argument("--alpha", type=float, default=8.0, help="its term is scaled by alpha/rank")
                k.add_argument("--text-encoder", action="store_true", help="also train a LoRA of the text encoder")
            else:
                k.add_argument("--train-text-encoder", action="store_true",
                               help="train the text encoder with the UNet on the denoising loss instead of freezing "
                                    "it (the built-in model: binds each shape's colour to its position)")


def _add_common(p: argparse.ArgumentParser, kind: str) -> None:
    d = TrainConfig()
    o = OBJECTIVE_DEFAULTS[kind]
    p.add_argument("--data", required=True, help='a folder of captioned images, or "shapes" (procedural)')
    p.add_argument("--data-size", type=int, default=0, help="number of items of --data shapes")
    p.add_argument("--two-shapes", type=float, default=TWO_SHAPES_PROB, metavar="P",
                   help="--data shapes: share of two-shape scenes (the default is what the evaluation draws)")
    p.add_argument("--resolution", type=int, default=64, help="training images are size x size")
    p.add_argument("--random-crop", action="store_true", help="random instead of center crops")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (they break 'on the left' captions)")
    p.add_argument("--caption-dropout", type=float, default=o["caption_dropout"], help="P(empty caption), for CFG")
    p.add_argument("--holdout", type=int, default=64, help="items held out for evaluation")
    p.add_argument("--out", default=f"runs/{kind}", help="run directory")
    p.add_argument("config", nargs="?", help="JSON file of ModelConfig fields, over the built-in tiny sizes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. unet.model_channels=96")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, across all processes")
    p.add_argument("--lr", type=float, default=o["lr"], help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear LR warmup")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine decays to lr x this")
    p.add_argument("--weight-decay", type=float, default=o["weight_decay"], help="AdamW, on matrices only")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = off")
    p.add_argument("--ema-decay", type=float, default=o["ema_decay"], help="0 = no EMA")
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision, help="autocast dtype")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest ones kept")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps per log.jsonl record")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between picture grids")
    p.add_argument("--seed", type=int, default=d.seed, help="weights, data order and noise")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loader processes")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: CUDA if present")
    p.add_argument("--resume", help='a checkpoint file, or "latest" (the newest in --out; fresh start if none)')
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels, so GPU runs and resumes repeat bit for bit (CPU runs always do)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def model_settings(args, base: ModelConfig = TINY) -> tuple[dict, dict]:
    """(ModelConfig fields, CLIP image-tower fields) from the CONFIG file and --set, over `base`."""
    settings = base.to_dict()
    vision = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"config file {path}: {'not a regular file' if path.exists() else 'no such file'}")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"config file {path}: not UTF-8 JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: a JSON {type(loaded).__name__}, expected an object of fields")
        vision = loaded.pop("vision", {})
        settings = _merge(settings, loaded)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as v_prediction
        *parents, leaf = key.split(".")
        target = vision if parents[:1] == ["vision"] else settings
        for name in parents[1:] if target is vision else parents:
            target = target.setdefault(name, {})
        target[leaf] = value
    return settings, vision


def _load_state(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    # position_ids is a buffer some exporters (transformers < 4.31) write and our CLIP does not keep
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the {what} weights do not fit its config: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")


PART_LABELS = {"text_encoder": "text encoder", "vae": "VAE", "unet": "UNet"}


def load_part(path: str, part: str) -> tuple[ModelConfig, dict]:
    """(config, state dict) of one part of a native file (`sdtorch train clip|vae`'s, or a whole model's)."""
    config, parts = load_parts(path)
    if part not in parts:
        raise ValueError(f"{path} holds no {PART_LABELS[part]} weights")
    return config, parts[part]


def build_unet_models(args, settings: dict) -> StableDiffusionModels:
    """The UNet's model: --init's (for fine-tuning) or a new UNet, with the frozen text encoder and VAE from
    --clip/--vae (or --init); a new UNet's input width and context width follow the VAE and the text encoder."""
    files = {}  # part -> (path, state)
    cfg = ModelConfig.from_dict(settings)
    if args.init:
        loaded = load_checkpoint(args.init)  # any SD 1.x file or diffusers folder the generator loads
        cfg = loaded.config
        files.update({part: (args.init, getattr(loaded.models, part).state_dict()) for part in PREFIXES})
    for flag, part, field in ((args.clip, "text_encoder", "clip"), (args.vae, "vae", "vae")):
        if flag:
            loaded_cfg, state = load_part(flag, part)
            cfg = cfg.replace(**{field: getattr(loaded_cfg, field)})
            files[part] = (flag, state)
    missing = [p for p in ("text_encoder", "vae") if p not in files]
    if missing:
        raise ValueError(f"the UNet trainer needs a trained {' and '.join(missing)}: give --clip and --vae (files "
                         "written by `sdtorch train clip` / `sdtorch train vae`), or --init CHECKPOINT")
    if "unet" not in files:
        cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=cfg.vae.embed_dim,
                                                   out_channels=cfg.vae.embed_dim, context_dim=cfg.clip.hidden_size))
    if args.prediction_type:
        cfg = cfg.replace(prediction_type=args.prediction_type)
    if not args.init:  # a new model's native size is what it is trained at (generate's default width/height)
        cfg = cfg.replace(resolution=args.resolution)
    models = StableDiffusionModels(cfg)
    for part, (path, state) in files.items():
        _load_state(getattr(models, part), state, part, path)
    return models


def text_collate(cfg: ModelConfig) -> Collate:
    """Batches with token ids for `cfg`'s text encoder (its pad token and context length)."""
    tokenizer = CLIPTokenizer.default(pad_token_id=cfg.clip_pad_token_id)
    return Collate(tokenizer, cfg.clip.max_position_embeddings)


def build_objective(args) -> tuple[torch.nn.Module, Collate]:
    """The objective `args.objective` names, and the collate function its batches need."""
    settings, vision = model_settings(args)
    try:
        check_config(ModelConfig.from_dict(settings), "CONFIG/--set")
        if not isinstance(vision, dict):
            raise TypeError(f"vision must be an object of fields, got {vision!r}")
        check_fields(CLIPVisionConfig(image_size=args.resolution), "CONFIG/--set", "vision.", vision)
        CLIPVisionConfig(**{"image_size": args.resolution, **vision})
    except (TypeError, AttributeError) as e:  # a field that does not exist, or a part that is not an object
        raise ValueError(f"CONFIG/--set: {e}") from None
    if args.objective == "clip":
        cfg = ModelConfig.from_dict(settings)
        text = cfg.clip
        tower = dict(image_size=args.resolution, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                     num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads)
        return CLIPObjective(text, CLIPVisionConfig(**{**tower, **vision}), args.projection_dim), text_collate(cfg)
    if args.objective == "vae":
        cfg, state = ModelConfig.from_dict(settings).vae, None
        if args.init:
            loaded_cfg, state = load_part(args.init, "vae")
            cfg = loaded_cfg.vae
        objective = VAEObjective(cfg, args.loss, args.kl_weight, args.decoder_only, args.cache_encodings,
                                 args.latent_noise, args.edge_weight)
        if state is not None:
            _load_state(objective.vae, state, "vae", args.init)
        return objective, Collate()
    if args.objective == "lora" and not args.init:
        raise ValueError("train lora needs --init MODEL: the model the LoRA is for")
    models = build_unet_models(args, settings)
    collate = text_collate(models.config)
    empty_ids = collate.tokenizer([""], max_length=collate.max_length)  # (1, L): the unconditional prompt
    if args.objective == "lora":
        objective = LoraObjective(models, empty_ids, args.rank, args.alpha, args.text_encoder,
                                  min_snr_gamma=args.min_snr_gamma, zero_terminal_snr=args.zero_terminal_snr,
                                  cache_items=args.cache_encodings, latent_noise=args.latent_noise)
        objective.metadata.update(kohya_metadata(args))
        return objective, collate
    objective = UNetObjective(models, empty_ids, args.min_snr_gamma, args.zero_terminal_snr, args.cache_encodings,
                              args.latent_noise, args.train_text_encoder)
    if args.grad_checkpointing:
        unet = models.unet
        use_gradient_checkpointing([*unet.input_blocks, unet.middle_block, *unet.output_blocks])
    return objective, collate


def kohya_metadata(args) -> dict[str, str]:
    """The ss_* entries kohya's train_network.py writes that a LoRA run knows before it starts."""
    return {"ss_sd_model_name": Path(args.init).name, "ss_resolution": f"({args.resolution}, {args.resolution})",
            "ss_learning_rate": str(args.lr), "ss_unet_lr": str(args.lr),
            "ss_text_encoder_lr": str(args.lr) if args.text_encoder else "None", "ss_max_train_steps": str(args.steps),
            "ss_steps": str(args.steps), "ss_batch_size_per_device": str(args.batch_size), "ss_seed": str(args.seed),
            "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": str(args.warmup_steps),
            "ss_optimizer": "torch.optim.adamw.AdamW", "ss_mixed_precision": {"fp32": "no"}.get(args.precision,
                                                                                            args.precision),
            "ss_clip_skip": "None", "ss_min_snr_gamma": str(args.min_snr_gamma),
            "ss_training_started_at": str(time.time())}


def train_config(args) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, precision=args.precision, ckpt_every=args.ckpt_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, eval_every=args.eval_every,
        sample_every=args.sample_every, seed=args.seed, workers=args.workers, device=args.device,
        resume=args.resume, deterministic=args.deterministic, progress=not args.quiet)


def run_train(args) -> int:
    """Run `sdtorch train ...` from parsed arguments; prints a summary and returns the exit code."""
    cfg = train_config(args)
    cfg.validate()
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a run folder")
    torch.manual_seed(args.seed)  # the same initial weights in every process and every run with this seed
    objective, collate = build_objective(args)
    # A pool whose encodings are cached is gone over every epoch: its drawn scenes are kept as well.
    source = open_source(args.data, args.data_size, args.resolution, args.seed, args.two_shapes,
                         keep=getattr(args, "cache_encodings", 0))
    train_part, holdout_part = split_holdout(source, args.holdout, args.seed)
    if hasattr(objective, "metadata"):
        objective.metadata["ss_num_train_images"] = str(len(train_part))
    train_items = TrainItems(train_part, TrainTransform(args.resolution, args.random_crop, args.flip,
                                                        args.caption_dropout))
    holdout_items = TrainItems(holdout_part, TrainTransform(args.resolution))  # center crops, captions kept
    summary = train(objective, train_items, holdout_items, collate, cfg)
    if summary["rank"] != 0:
        return 0
    if summary["export"]:
        print(f"wrote {summary['export']}")
    state = "interrupted at" if summary["interrupted"] else "trained to"
    print(f"{state} step {summary['step']} in {summary['wall_s']:.1f} s (data wait {summary['data_share']:.1%}, "
          f"eval/checkpoints/logging {summary['other_share']:.1%}); last eval: {summary['eval']}")
    return 0
