"""Residual blocks, resamplers and timestep embeddings of the diffusers-layout UNets (SD, SDXL, IF,
unCLIP) and the VAE.

Parameter names follow diffusers' (ResnetBlock2D, Downsample2D, Upsample2D, TimestepEmbedding), so
their state dicts load as they are. Every GroupNorm that is followed by SiLU or GELU is one fused
diffkern.nn.GroupNorm(activation="silu" / "gelu") (with the ADM scale-shift inside it where the block
has one), so the whole block follows diffkern.use_backend(...).
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


# diffusers' get_activation names -> torch modules (diffusers.models.activations.ACT2CLS).
ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name):
    """A fresh activation module for a diffusers activation name ("silu", "swish", "gelu", ...)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[key]()


# diffusers' activation names whose module ops.group_norm computes fused (nn.SiLU; nn.GELU() is the
# erf form, "gelu" in ops.group_norm), e.g. DeepFloyd IF's act_fn "gelu".
_FUSED = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


def fused_activation(name):
    """The ops.group_norm activation computing diffusers' activation `name`, or None if none does."""
    return _FUSED.get(name.lower()) if isinstance(name, str) else None


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: [+ cond_proj(condition)] -> linear_1 -> act -> linear_2
    [-> post_act] (diffusers' TimestepEmbedding and its key names).

    cond_proj_dim: width of `condition` (diffusers' timestep_cond, LCM's guidance embedding),
    projected without bias onto the input. out_dim: width of linear_2's output (time_embed_dim).
    """

    def __init__(self, in_channels, time_embed_dim, act_fn="silu", out_dim=None, post_act_fn=None,
                 cond_proj_dim=None, sample_proj_bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, sample_proj_bias)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample, condition=None):
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("TimestepEmbedding: condition given but the layer has no cond_proj "
                                 "(time_cond_proj_dim is None)")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return sample if self.post_act is None else self.post_act(sample)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block of the diffusers UNets and VAE (diffusers' ResnetBlock2D).

        h = act(norm1(x));  [x, h = resample(x), resample(h)];  h = conv1(h)
        default:      h = act(norm2(h + time_emb_proj(act(temb))))
        scale_shift:  scale, shift = time_emb_proj(act(temb)).chunk(2);  h = act(norm2(h) * (1 + scale) + shift)
        h = conv2(dropout(h));  out = (shortcut(x) + h) / output_scale_factor

    Every norm followed by SiLU or GELU is one fused ops.group_norm (with the scale-shift inside it in
    the "scale_shift" mode); other activations (mish, relu) run after the (fused scale-shift) norm.

    Args:
        in_channels, out_channels: conv_shortcut (1x1) exists exactly when they differ.
        temb_channels: width of the time embedding, or None for no time_emb_proj (VAE).
        groups, groups_out: GroupNorm groups of norm1 and norm2 (groups_out defaults to groups).
        eps: GroupNorm epsilon.
        dropout: before conv2.
        output_scale_factor: divides the sum (mid_block_scale_factor / resnet_out_scale_factor).
        act_fn: diffusers' non_linearity ("silu"/"swish", "gelu", "mish", "relu").
        time_embedding_norm: "default" (add) or "scale_shift" (AdaGN: time_emb_proj is 2x wide).
        skip_time_act: feed temb to time_emb_proj without the activation (IF's resnet_skip_time_act).
        up, down: nearest x2 upsampling / 2x2 average pooling of both paths after norm1 (the
            resnet up/downsamplers of ResnetDownsampleBlock2D, SimpleCrossAttn*Block2D).
    """

    def __init__(self, in_channels, out_channels=None, temb_channels=None, *, groups=32, groups_out=None,
                 eps=1e-6, dropout=0.0, output_scale_factor=1.0, act_fn="silu", time_embedding_norm="default",
                 skip_time_act=False, up=False, down=False):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"ResnetBlock2D: time_embedding_norm must be 'default' or 'scale_shift', "
                             f"got {time_embedding_norm!r}")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.time_embedding_norm, self.skip_time_act = time_embedding_norm, skip_time_act
        self.up, self.down = up, down
        # SiLU and GELU go inside the norm kernel; any other activation is a module applied after it.
        fused = fused_activation(act_fn)
        self.nonlinearity = activation(act_fn)
        self._act_after_norm = fused is None
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation=fused)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            width = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, width)
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, activation=fused)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def _norm_act(self, norm, h, scale=None, shift=None):
        h = norm(h, scale, shift)
        return self.nonlinearity(h) if self._act_after_norm else h

    def forward(self, x, temb=None):
        h = self._norm_act(self.norm1, x)
        if self.up:
            x, h = F.interpolate(x, scale_factor=2.0, mode="nearest"), F.interpolate(h, scale_factor=2.0,
                                                                                       mode="nearest")
        elif self.down:
            x, h = F.avg_pool2d(x, kernel_size=2, stride=2), F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.conv1(h)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D: this block was built with temb_channels; pass temb")
            emb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
            if self.time_embedding_norm == "scale_shift":
                scale, shift = emb.chunk(2, dim=1)
                h = self._norm_act(self.norm2, h, scale.contiguous(), shift.contiguous())
            else:
                h = self._norm_act(self.norm2, h + emb[:, :, None, None])
        else:
            h = self._norm_act(self.norm2, h)
        h = self.conv2(self.dropout(h))
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
