"""The extra embeddings of the diffusers UNet: text pooling into the time embedding (DeepFloyd IF,
`addition_embed_type="text"`), text+image (Kandinsky 2.1 style, "text_image"), on diffkern ops, and
the builders that pick the class / addition embedding for a UNet config.

Parameter names follow diffusers' (diffusers.models.embeddings), so state dicts load as they are.
The SDXL "text_time" embedding is a plain TimestepEmbedding (diffkern.nn.resnet) on
[text_embeds | sinusoids of time_ids]; the UNet builds it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffkern import ops
from diffkern.nn.resnet import TimestepEmbedding


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin | cos](2 pi t w) of a (B,) tensor, w ~ N(0, scale^2) frozen
    (`weight`; diffusers' GaussianFourierProjection with set_W_to_weight=False, log=False) -> (B, 2 * size)."""

    def __init__(self, embedding_size=256, scale=1.0, flip_sin_to_cos=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t):
        proj = t[:, None] * self.weight[None, :] * 2 * math.pi
        sin, cos = torch.sin(proj), torch.cos(proj)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class AttentionPooling(nn.Module):
    """Attention pooling of a token sequence into one vector (DeepFloyd IF's, as diffusers'
    AttentionPooling): a class token mean(x) + positional_embedding queries [class token | x].

    forward(x (B, L, embed_dim)) -> (B, embed_dim). The softmax runs on ops.attention (float32
    accumulation whatever the dtype, as the original's `softmax(weight.float())`).
    """

    def __init__(self, num_heads, embed_dim):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"AttentionPooling: num_heads {num_heads} must divide embed_dim {embed_dim}")
        # Initialised as diffusers does (randn / sqrt(width)); checkpoints overwrite it.
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads
        self.dim_per_head = embed_dim // num_heads

    def _split(self, t):
        B, S, _ = t.shape
        return t.view(B, S, self.num_heads, self.dim_per_head).transpose(1, 2)

    def forward(self, x):
        B, _, width = x.shape
        class_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        tokens = torch.cat([class_token, x], dim=1)
        # The original scales q and k by d**-0.25 each: the same d**-0.5 on the product.
        out = ops.attention(self._split(self.q_proj(class_token)), self._split(self.k_proj(tokens)),
                            self._split(self.v_proj(tokens)))
        return out.transpose(1, 2).reshape(B, width)


class TextTimeEmbedding(nn.Module):
    """IF's text conditioning of the time embedding: norm1 -> pool -> proj -> norm2
    (diffusers' TextTimeEmbedding). forward(hidden_states (B, L, encoder_dim)) -> (B, time_embed_dim)."""

    def __init__(self, encoder_dim, time_embed_dim, num_heads=64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states):
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


class TextImageTimeEmbedding(nn.Module):
    """text_norm(text_proj(text_embeds)) + image_proj(image_embeds) (diffusers' TextImageTimeEmbedding,
    addition_embed_type="text_image"). Each input (B, dim) -> (B, time_embed_dim)."""

    def __init__(self, text_embed_dim=768, image_embed_dim=768, time_embed_dim=1536):
        super().__init__()
        self.text_proj = nn.Linear(text_embed_dim, time_embed_dim)
        self.text_norm = nn.LayerNorm(time_embed_dim)
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)

    def forward(self, text_embeds, image_embeds):
        return self.image_proj(image_embeds) + self.text_norm(self.text_proj(text_embeds))


def one_width(model_name, cfg, key):
    """cfg[key] where these embeddings need a single width (a per-level list is an error naming it)."""
    if isinstance(cfg[key], (list, tuple)):
        raise ValueError(f"{model_name}: {key} must be one int with these options, got {list(cfg[key])}")
    return cfg[key]


def class_embedding(model_name, cfg, timestep_input_dim, time_embed_dim):
    """The UNet's `class_embedding` for its config (diffusers' _set_class_embedding), or None.

    num_class_embeds: an nn.Embedding of labels; "timestep": an MLP on the labels' sinusoids (IF-II's
    noise level); "identity": the labels are embeddings already (unCLIP's image embedding);
    "projection" / "simple_projection": an MLP / a Linear from projection_class_embeddings_input_dim.
    """
    kind = cfg.class_embed_type
    if kind is None and cfg.num_class_embeds is not None:
        return nn.Embedding(cfg.num_class_embeds, time_embed_dim)
    if kind == "timestep":
        return TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=cfg.act_fn)
    if kind == "identity":
        return nn.Identity()
    if kind in ("projection", "simple_projection"):
        width = cfg.projection_class_embeddings_input_dim
        if width is None:
            raise ValueError(f"{model_name}: class_embed_type={kind!r} needs "
                             "projection_class_embeddings_input_dim")
        if kind == "projection":
            return TimestepEmbedding(width, time_embed_dim)
        return nn.Linear(width, time_embed_dim)
    return None


def addition_embedding(model_name, cfg, time_embed_dim):
    """The UNet's `add_embedding` for its config (diffusers' _set_add_embedding), or None: "text"
    pools the (unprojected) text states, "text_image" mixes text and image embeds, "text_time" (SDXL)
    is an MLP on [text_embeds | sinusoids of time_ids]."""
    kind = cfg.addition_embed_type
    if kind == "text":
        width = cfg.encoder_hid_dim
        if width is None:
            width = one_width(model_name, cfg, "cross_attention_dim")
        return TextTimeEmbedding(width, time_embed_dim, num_heads=cfg.addition_embed_type_num_heads)
    if kind == "text_image":
        width = one_width(model_name, cfg, "cross_attention_dim")
        return TextImageTimeEmbedding(width, width, time_embed_dim)
    if kind == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if cfg[key] is None:
                raise ValueError(f"{model_name}: addition_embed_type='text_time' needs {key}")
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_embed_dim)
    return None
