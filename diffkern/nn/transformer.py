"""Spatial transformers of the LDM / Stable Diffusion UNet and the VAE's single-head self-attention.

Parameter names follow diffusers' Transformer2DModel / BasicTransformerBlock / FeedForward and the
VAE's mid-block Attention, so their state dicts load as they are. Every attention is a
diffkern.nn.Attention (every GroupNorm a diffkern.nn.GroupNorm), so the backends follow
diffkern.use_backend(...).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from diffkern.nn.attention import Attention, mask_to_bias
from diffkern.nn.group_norm import GroupNorm


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2 x dim_out, value * gelu(gate), exact (erf) GELU."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, width mult x dim; keys net.0.proj, net.2 (net.1 is the dropout)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text tokens, GEGLU MLP.

        x += attn1(norm1(x));  x += attn2(norm2(x), context);  x += ff(norm3(x))

    only_cross_attention: attn1 attends to the text too (its keys come from `context`).
    forward(x, context, attention_mask=None, encoder_attention_mask=None): the masks are diffusers'
    (a (B, S) keep-mask or a (B, 1, S) bias), over attn1's and attn2's keys respectively.
    """

    def __init__(self, dim, heads, dim_head, context_dim, *, dropout=0.0, norm_eps=1e-5,
                 only_cross_attention=False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, context_dim=context_dim if only_cross_attention else None, heads=heads,
                               dim_head=dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context, attention_mask=None, encoder_attention_mask=None):
        self_bias = mask_to_bias(attention_mask, x.dtype)
        cross_bias = mask_to_bias(encoder_attention_mask, x.dtype)
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, attn_bias=self_bias) + x
        x = self.attn2(self.norm2(x), context, attn_bias=cross_bias) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on text (diffusers'
    Transformer2DModel for continuous inputs, CompVis' SpatialTransformer).

    GroupNorm (eps 1e-6, no activation) -> proj_in -> depth x BasicTransformerBlock -> proj_out,
    plus the input as residual. proj_in/proj_out are 1x1 convolutions (SD1, LDM) or Linear layers
    (use_linear_projection: SD2); both are applied where diffusers applies them, so the floating
    point rounding matches too.

    Args:
        heads, dim_head: attention heads and head width; inner width heads x dim_head.
        in_channels: channels of the feature map.
        context_dim: width of encoder_hidden_states (the text tokens).
        depth: number of transformer blocks (transformer_layers_per_block).
        norm_num_groups: groups of the input GroupNorm.
        only_cross_attention: every block's attn1 attends to the text (see BasicTransformerBlock).

    forward(x (B, C, H, W), context (B, M, context_dim), attention_mask=None, encoder_attention_mask=None)
    -> (B, C, H, W); the masks as BasicTransformerBlock takes them.
    """

    def __init__(self, heads, dim_head, in_channels, context_dim, *, depth=1, norm_num_groups=32,
                 use_linear_projection=False, dropout=0.0, only_cross_attention=False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, kernel_size=1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout=dropout,
                                  only_cross_attention=only_cross_attention)
            for _ in range(depth)])
        self.proj_out = proj(inner, in_channels)

    def forward(self, x, context, attention_mask=None, encoder_attention_mask=None):
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, attention_mask, encoder_attention_mask)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, h.shape[-1]).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


class SpatialSelfAttention(Attention):
    """Self-attention over the pixels of a feature map with its own GroupNorm and residual: the
    VAE mid block's attention (diffusers keys group_norm, to_q, to_k, to_v, to_out.0, all with
    biases). The VAE uses one head as wide as the channels (head_dim = channels).

    forward(x (B, C, H, W)) -> (x + attention(group_norm(x))) / rescale_output_factor.
    """

    def __init__(self, channels, head_dim=None, *, norm_num_groups=32, eps=1e-6, rescale_output_factor=1.0):
        head_dim = head_dim or channels
        if channels % head_dim:
            raise ValueError(f"SpatialSelfAttention: head_dim {head_dim} must divide channels {channels}")
        super().__init__(channels, heads=channels // head_dim, dim_head=head_dim, qkv_bias=True,
                         out_bias=True)
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, channels, eps=eps)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)
        h = super().forward(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return (h + x) / self.rescale_output_factor
