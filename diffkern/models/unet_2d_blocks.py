"""The down, mid and up blocks of the LDM / Stable Diffusion UNet (diffusers' block names and keys).

Each block owns `resnets` (ResnetBlock2D), optionally `attentions` (SpatialTransformer, one after each
resnet) and `downsamplers` / `upsamplers` (a one-element ModuleList, as diffusers nests them).
"""

from __future__ import annotations

import torch
from torch import nn

from diffkern.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffkern.nn.transformer import SpatialTransformer


class _Level(nn.Module):
    """Shared construction: `num_layers` resnets, each optionally followed by a SpatialTransformer."""

    def _build(self, in_channels_per_layer, out_channels, temb_channels, *, num_layers, cross_attention,
               heads, cross_attention_dim, transformer_depth, groups, eps, dropout, use_linear_projection,
               output_scale_factor=1.0):
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels_per_layer(i), out_channels, temb_channels, groups=groups, eps=eps,
                          dropout=dropout, output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        self.attentions = None
        if cross_attention:
            # diffusers' convention: the head width is whatever the channels leave per head.
            self.attentions = nn.ModuleList([
                SpatialTransformer(heads, out_channels // heads, out_channels, cross_attention_dim,
                                   depth=transformer_depth, norm_num_groups=groups,
                                   use_linear_projection=use_linear_projection, dropout=dropout)
                for _ in range(num_layers)])

    def _attend(self, i, h, context):
        return h if self.attentions is None else self.attentions[i](h, context)


class DownBlock(_Level):
    """CrossAttnDownBlock2D (cross_attention=True) or DownBlock2D: resnet (+ transformer) x
    num_layers, then a stride-2 Downsample2D unless it is the last level.

    forward(h, temb, context) -> (h, skips): every intermediate output is a skip for the up path.
    """

    def __init__(self, in_channels, out_channels, temb_channels, *, add_downsample, downsample_padding=1,
                 **kw):
        super().__init__()
        self._build(lambda i: in_channels if i == 0 else out_channels, out_channels, temb_channels, **kw)
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                            padding=downsample_padding)])

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = self._attend(i, resnet(h, temb), context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlockCrossAttn(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) x num_layers, at constant width."""

    def __init__(self, channels, temb_channels, *, heads, cross_attention_dim, transformer_depth, groups, eps,
                 dropout, use_linear_projection, output_scale_factor, num_layers=1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups=groups, eps=eps, dropout=dropout,
                          output_scale_factor=output_scale_factor)
            for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(heads, channels // heads, channels, cross_attention_dim,
                               depth=transformer_depth, norm_num_groups=groups,
                               use_linear_projection=use_linear_projection, dropout=dropout)
            for _ in range(num_layers)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context), temb)
        return h


class UpBlock(_Level):
    """CrossAttnUpBlock2D (cross_attention=True) or UpBlock2D: (concat a skip, resnet
    (+ transformer)) x num_layers, then nearest x2 + conv unless it is the last level.

    The first resnet takes the previous level's output (prev_output_channel) and the last one the
    skip from the level below (in_channels); the others see out_channels + out_channels.
    forward(h, skips, temb, context, upsample_size=None) consumes skips from the end.
    """

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, *, add_upsample,
                 num_layers, **kw):
        super().__init__()

        def resnet_in(i):
            skip = in_channels if i == num_layers - 1 else out_channels
            return (prev_output_channel if i == 0 else out_channels) + skip

        self._build(resnet_in, out_channels, temb_channels, num_layers=num_layers, **kw)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def forward(self, h, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb)
            h = self._attend(i, h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h
