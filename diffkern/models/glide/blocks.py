"""The blocks of OpenAI's ADM UNet (improved-diffusion / guided-diffusion / GLIDE), with OpenAI's keys.

Module and index names match OpenAI's `unet.py` so the released state dicts load unchanged:
ResBlock (in_layers.0/.2, emb_layers.1, out_layers.0/.3, skip_connection), AttentionBlock
(norm, qkv, encoder_kv, proj_out), Upsample (conv), Downsample (op). Where OpenAI applies a GroupNorm
and then SiLU (and, in between, the scale-shift of the time embedding), this file runs one fused
diffkern.nn.GroupNorm; the index slots OpenAI used for the separate SiLU stay as parameter-free
nn.Identity so that the numbering, and hence the keys, do not move.

Only 2-D images are supported (OpenAI's `dims=1/3` variants are not used by GLIDE).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from diffkern import ops
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import timestep_embedding as _sinusoidal

NORM_GROUPS = 32  # OpenAI's normalization(): GroupNorm32, 32 groups, eps 1e-5


def timestep_embedding(timesteps, dim, max_period=10000):
    """OpenAI's sinusoidal embedding: [cos | sin] of t * max_period ** (-i / (dim // 2)), float32.

    The same frequencies as diffusers' layout with flip_sin_to_cos=True, downscale_freq_shift=0, so
    this delegates to diffkern.nn.resnet.timestep_embedding (an odd dim gets a zero last column in
    both)."""
    return _sinusoidal(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0, max_period=max_period)


class GroupNorm32(GroupNorm):
    """OpenAI's GroupNorm32 (32 groups, statistics in float32), with an optional fused SiLU and
    scale-shift.

    OpenAI computes ``GN(x.float()).to(x.dtype)`` with float32 affine parameters, then SiLU and the
    scale-shift in x's dtype. diffkern's op already accumulates the statistics in float32 and rounds
    once at the end; under float16 (`convert_to_fp16` keeps norm parameters float32, as OpenAI does)
    the (C,) affine parameters are cast to x's dtype per call, since the op takes one dtype. The
    result differs from OpenAI's only by float16 rounding of the intermediate steps OpenAI rounds.
    """

    def __init__(self, channels, activation=None):
        super().__init__(NORM_GROUPS, channels, eps=1e-5, activation=activation)

    def forward(self, x, scale=None, shift=None):
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        return ops.group_norm(x, self.num_groups, w, b, self.eps, scale=scale, shift=shift,
                              activation=self.activation, backend=self.backend)


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential whose ResBlocks also take the time embedding and AttentionBlocks the text."""

    def forward(self, x, emb, encoder_out=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, encoder_out)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (key `conv`) when use_conv."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 conv (use_conv) or a 2x2 average pool; key `op` either way."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError(f"Downsample: out_channels ({out_channels}) must equal channels "
                                 f"({channels}) without use_conv")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """ADM residual block, optionally resampling (BigGAN-style up/down) and with scale-shift norm.

        h = conv_in(resample(silu(GN_in(x))))                      in_layers.0 (fused), in_layers.2
        scale, shift = chunk(Linear(silu(emb)), 2)                  emb_layers.1
        h = conv_out(dropout(silu(GN_out(h) * (1 + scale) + shift)))  out_layers.0 (fused), .3
        out = skip(resample(x)) + h

    Without use_scale_shift_norm the projected embedding (out_channels wide) is added to h before
    GN_out instead. `skip_connection` is identity when the channel count is kept, else a 1x1 conv
    (3x3 with use_conv). up/down resample by nearest 2x / 2x2 average pool after the input norm and
    on the skip path (OpenAI's h_upd / x_upd, which hold no parameters).
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be True")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, activation="silu"),
            nn.Identity(),  # OpenAI's SiLU slot: fused into the norm
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels, activation="silu"),
            nn.Identity(),  # OpenAI's SiLU slot (scale-shift variant): fused into the norm
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.out_layers[3].weight)  # OpenAI's zero_module: each block starts as identity
        nn.init.zeros_(self.out_layers[3].bias)
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers[0](x)
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        out_norm, rest = self.out_layers[0], self.out_layers[2:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h, scale=scale.contiguous(), shift=shift.contiguous())
        else:
            h = out_norm(h + emb_out[:, :, None, None])
        return self.skip_connection(x) + rest(h)


class AttentionBlock(nn.Module):
    """ADM spatial self-attention, optionally also attending to text tokens (GLIDE's encoder_kv).

        qkv = conv1x1(GN(x))                    norm, qkv: (B, 3C, T), T = H*W
        out = x + proj_out(attention(q, [ek; k], [ev; v]))

    OpenAI's legacy QKVAttention layout: the 3C qkv channels are per head [q_h | k_h | v_h] blocks of
    ch = C / heads rows (not [q | k | v]); encoder_kv's 2C channels are per head [k_h | v_h]; encoder
    keys come before the image keys; the scale 1/sqrt(sqrt(ch)) on q and on k is 1/sqrt(ch) overall.
    Here q, k, v and the encoder keys/values are strided views of the conv outputs, and the text is
    passed as the op's kv_prefix, so nothing is copied or concatenated before the attention kernel.

    heads = channels // num_head_channels when num_head_channels != -1, else num_heads.
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, encoder_channels=None):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        elif num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(f"AttentionBlock: num_head_channels ({num_head_channels}) must divide "
                             f"channels ({channels})")
        else:
            heads = channels // num_head_channels
        if heads <= 0 or channels % heads:
            raise ValueError(f"AttentionBlock: num_heads ({heads}) must divide channels ({channels})")
        self.channels, self.num_heads = channels, heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = None
        if encoder_channels is not None:
            self.encoder_kv = nn.Conv1d(encoder_channels, 2 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # OpenAI's zero_module
        nn.init.zeros_(self.proj_out.bias)

    def _heads(self, t, parts):
        """(B, parts*C, L) laid out per head [part_0 | part_1 | ...] -> `parts` (B, heads, L, ch) views."""
        B, _, L = t.shape
        t = t.view(B, self.num_heads, parts, self.channels // self.num_heads, L)
        return [t[:, :, i].transpose(-1, -2) for i in range(parts)]

    def forward(self, x, encoder_out=None):
        """x: (B, C, H, W); encoder_out: None or (B, encoder_channels, L), e.g. GLIDE's text tokens.
        Without encoder_out the block is plain self-attention, as OpenAI's."""
        B, C = x.shape[:2]
        q, k, v = self._heads(self.qkv(self.norm(x).reshape(B, C, -1)), 3)
        prefix = None
        if encoder_out is not None:
            if self.encoder_kv is None:
                raise ValueError("AttentionBlock: encoder_out given but the block has no encoder_kv "
                                 "(built without encoder_channels)")
            prefix = tuple(self._heads(self.encoder_kv(encoder_out), 2))
        ch = C // self.num_heads
        h = ops.attention(q, k, v, kv_prefix=prefix, scale=ch ** -0.5)  # (B, heads, T, ch)
        h = self.proj_out(h.transpose(-1, -2).reshape(B, C, -1))
        return x + h.reshape(x.shape)
