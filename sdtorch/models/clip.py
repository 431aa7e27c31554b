"""CLIP's text transformer (Radford et al. 2021): OpenAI's ViT-L/14 tower of SD 1.x, and OpenCLIP's ViT-H/14
(SD 2.x) and ViT-bigG/14 (SDXL) towers, which are the same network with GELU and other sizes.

Attribute names mirror Hugging Face's `CLIPTextModel`, which is what the original SD 1.x checkpoints store under
`cond_stage_model.transformer.text_model.*`; OpenCLIP's own names (SD 2.x/SDXL files) are renamed on the way in and
out by checkpoint/openclip_keys.py.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPTextConfig
from .attention import attention


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        w = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.causal = causal
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(w, w) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # causal: token i only sees tokens <= i, as in a language model (CLIP's text tower is GPT-2-like);
        # the image tower (train/image_encoder.py) lets every patch see every patch
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                                       causal=self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer. `cfg` may be the text or the image tower's config (same field names)."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)  # learned positions

    def forward(self, input_ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """token_embeds (B, L, D): token vectors to use instead of looking up input_ids' (textual inversion)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = self.token_embedding(input_ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding(positions)  # (B, L) -> (B, L, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, D), optionally from an earlier layer ("clip skip")."""

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"at most {cfg.max_position_embeddings} tokens per sequence, got {input_ids.shape[1]}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{input_ids.min()}, {input_ids.max()}]")

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
                ) -> torch.Tensor:
        """clip_skip in A1111's numbering: 1 = last layer, 2 = penultimate layer; the final LayerNorm is applied to
        whichever layer is returned, as A1111 does (and SD 2.x's penultimate-layer conditioning). token_embeds: see
        CLIPEmbeddings."""
        cfg = self.config
        self.check_ids(input_ids)
        if not 1 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [1, {cfg.num_hidden_layers}], got {clip_skip}")
        x = self.embeddings(input_ids, token_embeds)
        for layer in self.encoder.layers[: cfg.num_hidden_layers - clip_skip + 1]:  # skipped layers never run
            x = layer(x)
        return self.final_layer_norm(x)

    def hidden_and_pooled(self, input_ids: torch.Tensor, clip_skip: int = 2, token_embeds: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's use of a tower (Podell et al. 2023, sec. 2.1): layer -clip_skip's hidden states WITHOUT the final
        LayerNorm (B, L, D), and the pooled text (B, P): the last layer, normed, at each row's end-of-text token (the
        highest id, as OpenCLIP finds it), through `text_projection` when the tower has one. token_embeds: see
        CLIPEmbeddings."""
        self.check_ids(input_ids)
        cfg = self.config
        x = self.embeddings(input_ids, token_embeds)
        hidden = None
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if i == cfg.num_hidden_layers - clip_skip:
                hidden = x
        last = self.final_layer_norm(x)
        pooled = last[torch.arange(len(input_ids), device=last.device), input_ids.argmax(dim=-1)]  # (B, L, D) -> (B, D)
        if cfg.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled
