"""Residual blocks, resamplers and timestep embeddings of the LDM / Stable Diffusion UNet and VAE.

Parameter names follow diffusers' (ResnetBlock2D, Downsample2D, Upsample2D, TimestepEmbedding), so
their state dicts load as they are. Every GroupNorm that is followed by SiLU is one fused
diffkern.nn.GroupNorm(activation="silu"), so the whole block follows diffkern.use_backend(...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkern.nn.group_norm import GroupNorm


def timestep_embedding(timesteps, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                       max_period=10000):
    """Sinusoidal timestep embedding (DDPM, Ho et al. 2020, as diffusers' get_timestep_embedding).

    Args:
        timesteps: (N,) tensor, integer or fractional.
        dim: embedding width; an odd width gets one zero column at the end.
        flip_sin_to_cos: order [cos | sin] (Stable Diffusion, LDM) instead of [sin | cos].
        downscale_freq_shift: frequencies are max_period ** (-i / (dim // 2 - shift)), i < dim // 2;
            0 for SD/LDM (the CompVis layout), 1 for the original DDPM one.
        scale: multiplies the arguments of sin and cos.

    Returns:
        (N, dim) float32, whatever the dtype of `timesteps`.
    """
    if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
        got = tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__
        raise ValueError(f"timestep_embedding: timesteps must be a 1-D tensor, got {got}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2 (diffusers' key names)."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, emb):
        return self.linear_2(self.act(self.linear_1(emb)))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block of the SD/LDM UNet and VAE (diffusers' ResnetBlock2D, "default"
    time-embedding mode: the projected embedding is added between conv1 and norm2).

        h = conv1(silu(norm1(x)));  h += time_emb_proj(silu(temb));  h = conv2(dropout(silu(norm2(h))))
        out = (shortcut(x) + h) / output_scale_factor

    Args:
        in_channels, out_channels: conv_shortcut (1x1) exists exactly when they differ.
        temb_channels: width of the time embedding, or None for no time_emb_proj (VAE).
        groups, groups_out: GroupNorm groups of norm1 and norm2 (groups_out defaults to groups).
        eps: GroupNorm epsilon.
        dropout: before conv2.
        output_scale_factor: divides the sum (the UNet mid block's mid_block_scale_factor).
    """

    def __init__(self, in_channels, out_channels=None, temb_channels=None, *, groups=32, groups_out=None,
                 eps=1e-6, dropout=0.0, output_scale_factor=1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block was built with temb_channels; pass temb")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        # A division, not a multiplication by the reciprocal: bit-for-bit what the checkpoints
        # were trained and are evaluated with elsewhere.
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2 (key `conv`).

    padding=1 is the UNet's (downsample_padding); padding=0 is the VAE encoder's, which pads
    asymmetrically by one on the right and bottom first, as the CompVis autoencoder was trained.
    """

    def __init__(self, channels, out_channels=None, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 convolution (key `conv`).

    forward(x, output_size=None): output_size (H, W) replaces the factor 2, so that a UNet fed a
    latent whose sides are not multiples of 2**levels upsamples back to its skip connection's size
    (a 20x12 latent goes 20 -> 10 -> 5 -> 3 down, and 3 -> 5 -> 10 -> 20 up).
    """

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x, output_size=None):
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x)
