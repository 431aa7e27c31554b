"""diffusers' key names <-> the original checkpoint's, by rules instead of a table.

diffusers keeps every layer of the original UNet and VAE but files them under other block names
(`input_blocks.4.1.` is `down_blocks.1.attentions.0.`) and renames a handful of layers inside resnets and the VAE's
attention. So a key converts in two steps: swap its block prefix, then rename the layer right after it. The block
pairs come from the index arithmetic of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`,
generalised to any number of levels and res-blocks; one list serves both directions.
"""
from dataclasses import dataclass

from ..config import UNetConfig, VAEConfig

Renames = tuple[tuple[str, str], ...]  # (original layer name, diffusers layer name), first match wins

UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
               ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut."))
VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
# Written with today's names; diffusers < 0.14 folders (still common on the Hub) use the second set, read too.
VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0."),
                 ("q.", "query."), ("k.", "key."), ("v.", "value."), ("proj_out.", "proj_attn."))


@dataclass(frozen=True)
class BlockRule:
    """One block: its key prefix in each layout, and the layer renames inside it."""
    original: str
    diffusers: str
    renames: Renames = ()


def unet_rules(cfg: UNetConfig) -> list[BlockRule]:
    """Block pairs of the UNet. With n res-blocks per level, down level i holds input blocks (n+1)i+1 ... (n+1)i+n
    and its downsampler is block (n+1)(i+1); diffusers' up block i (level L-1-i, as they run) holds output blocks
    (n+1)i ... (n+1)i+n, the last ending in the upsampler, layer 2 behind an attention, else layer 1."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    attends = [2 ** level in cfg.attention_resolutions for level in range(levels)]
    rules = [BlockRule("time_embed.0.", "time_embedding.linear_1."),
             BlockRule("time_embed.2.", "time_embedding.linear_2."),
             BlockRule("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL's added conditions
             BlockRule("label_emb.0.2.", "add_embedding.linear_2."),
             BlockRule("input_blocks.0.0.", "conv_in."),
             BlockRule("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
             BlockRule("middle_block.1.", "mid_block.attentions.0."),
             BlockRule("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET),
             BlockRule("out.0.", "conv_norm_out."), BlockRule("out.2.", "conv_out.")]
    for i in range(levels):
        for j in range(n):
            block = (n + 1) * i + j + 1
            rules.append(BlockRule(f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if attends[i]:
                rules.append(BlockRule(f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            rules.append(BlockRule(f"input_blocks.{(n + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        level = levels - 1 - i
        for j in range(n + 1):
            block = (n + 1) * i + j
            rules.append(BlockRule(f"output_blocks.{block}.0.", f"up_blocks.{i}.resnets.{j}.", UNET_RESNET))
            if attends[level]:
                rules.append(BlockRule(f"output_blocks.{block}.1.", f"up_blocks.{i}.attentions.{j}."))
        if level > 0:
            layer = 2 if attends[level] else 1
            rules.append(BlockRule(f"output_blocks.{(n + 1) * i + n}.{layer}.", f"up_blocks.{i}.upsamplers.0."))
    return rules


def vae_rules(cfg: VAEConfig) -> list[BlockRule]:
    """Block pairs of the autoencoder. The original decoder stores its stages lowest-resolution-last (`up.0` is full
    resolution); diffusers numbers them in the order they run, so decoder `up.{L-1-i}` is `up_blocks.{i}`."""
    n, levels = cfg.num_res_blocks, len(cfg.ch_mult)
    rules = [BlockRule("quant_conv.", "quant_conv."), BlockRule("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [BlockRule(f"{part}.conv_in.", f"{part}.conv_in."),
                  BlockRule(f"{part}.conv_out.", f"{part}.conv_out."),
                  BlockRule(f"{part}.norm_out.", f"{part}.conv_norm_out."),
                  BlockRule(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
                  BlockRule(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION),
                  BlockRule(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET)]
    for i in range(levels):
        rules += [BlockRule(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", VAE_RESNET)
                  for j in range(n)]
        rules += [BlockRule(f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.",
                            VAE_RESNET) for j in range(n + 1)]
        if i < levels - 1:
            rules += [BlockRule(f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."),
                      BlockRule(f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")]
    return rules


def to_diffusers(key: str, rules: list[BlockRule]) -> str | None:
    """An original-layout key (within one model) in diffusers' layout; None if no block claims it."""
    return _convert(key, rules, to_diffusers=True)


def from_diffusers(key: str, rules: list[BlockRule]) -> str | None:
    """A diffusers-layout key in the original layout; None if no block claims it."""
    return _convert(key, rules, to_diffusers=False)


def _convert(key: str, rules: list[BlockRule], to_diffusers: bool) -> str | None:
    for rule in rules:
        src, dst = (rule.original, rule.diffusers) if to_diffusers else (rule.diffusers, rule.original)
        if key.startswith(src):
            rest = key[len(src):]
            for original, diffusers in rule.renames:
                old, new = (original, diffusers) if to_diffusers else (diffusers, original)
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            return dst + rest
    return None
