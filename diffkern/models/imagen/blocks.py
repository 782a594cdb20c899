"""Imagen's Efficient U-Net blocks (Saharia et al. 2022, Appendix B.1, Figs. A.27-A.30), registered
as block types of diffkern's UNet2DConditionModel:

    down: EfficientDownBlock2D, EfficientCrossAttnDownBlock2D
    up:   EfficientUpBlock2D, EfficientCrossAttnUpBlock2D

What makes them "efficient", as the paper lists it:
- DBlock: the stride-2 convolution comes FIRST (in_channels -> out_channels), so the block's resnets
  run at the lower resolution; UBlock: the upsampling comes LAST. Every block resamples (the UNet's
  add_downsample / add_upsample flags are ignored), so inputs must be multiples of 2 ** levels and
  no mid block is needed (mid_block_type=None).
- One skip per block (its output), concatenated in the mirrored UBlock and scaled by 1/sqrt(2).
- Resnet counts per level from layers_per_block (the paper puts more at low resolution, e.g.
  [2, 4, 8, 8]); the UBlock runs as many as its DBlock.
- Attention only in the *CrossAttn* variants (the paper uses them at the lowest level(s) only): one
  added-KV attention after the resnets (text keys first, diffusers' SimpleCrossAttn attention), with
  only_cross_attention dropping the self-attention part.

Module layout: `resnets` holds the resnet that takes the skip (UNet2DConditionModel reads
len(up_block.resnets) as the number of skips an up block consumes), `more_resnets` the others.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffkern.models.unet_blocks.cross_attn import resnet
from diffkern.models.unet_blocks.registry import register_block
from diffkern.nn.attention import AddedKVAttention

SKIP_SCALE = 1 / math.sqrt(2)
_RES_KEYS = ("resnet_eps", "resnet_groups", "dropout", "resnet_time_scale_shift", "resnet_act_fn")


def _res_kw(kw):
    out = {k: kw[k] for k in _RES_KEYS if k in kw}
    return dict(out, output_scale_factor=kw.get("resnet_out_scale_factor", 1.0),
                skip_time_act=kw.get("resnet_skip_time_act", False))


def _attention(channels, kw):
    head_dim = kw.get("attention_head_dim") or 64
    if channels % head_dim:
        raise ValueError(f"attention_head_dim {head_dim} must divide the block's channels {channels}")
    if kw.get("cross_attention_dim") is None:
        raise ValueError("Efficient U-Net attention blocks need cross_attention_dim (the text width)")
    return AddedKVAttention(channels, channels // head_dim, head_dim, kw["cross_attention_dim"],
                            norm_num_groups=kw.get("resnet_groups", 32),
                            only_cross_attention=bool(kw.get("only_cross_attention", False)),
                            cross_attention_norm=kw.get("cross_attention_norm"))


class EfficientDownBlock2D(nn.Module):
    """DBlock: stride-2 conv (in -> out channels), num_layers resnets, [attention]; one skip (the output)."""

    has_cross_attention = False

    def __init__(self, *, in_channels, out_channels, temb_channels, num_layers=1, **kw):
        super().__init__()
        self.downsample = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        res = _res_kw(kw)
        self.more_resnets = nn.ModuleList([resnet(out_channels, out_channels, temb_channels, **res)
                                           for _ in range(num_layers)])
        self.attention = _attention(out_channels, kw) if self.has_cross_attention else None

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None, additional_residuals=None):
        h = self.downsample(hidden_states)
        for block in self.more_resnets:
            h = block(h, temb)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states, encoder_attention_mask)
        return h, (h,)


class EfficientCrossAttnDownBlock2D(EfficientDownBlock2D):
    has_cross_attention = True


class EfficientUpBlock2D(nn.Module):
    """UBlock: concat (h, skip / sqrt(2)), as many resnets as the mirrored DBlock, [attention], then
    nearest x2 + conv. UNet2DConditionModel passes num_layers = DBlock's + 1 (diffusers' convention)."""

    has_cross_attention = False

    def __init__(self, *, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=2, **kw):
        super().__init__()
        res = _res_kw(kw)
        count = max(num_layers - 1, 1)
        first = resnet(prev_output_channel + out_channels, out_channels, temb_channels, **res)
        self.resnets = nn.ModuleList([first])
        self.more_resnets = nn.ModuleList([resnet(out_channels, out_channels, temb_channels, **res)
                                           for _ in range(count - 1)])
        self.attention = _attention(out_channels, kw) if self.has_cross_attention else None
        self.upsample = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None,
                encoder_attention_mask=None):
        skip = res_hidden_states_tuple[-1]
        if skip.shape[2:] != hidden_states.shape[2:]:
            raise ValueError(f"EfficientUpBlock2D: feature map {tuple(hidden_states.shape[2:])} and skip "
                             f"{tuple(skip.shape[2:])} differ: the input sides must be multiples of "
                             "2 ** levels")
        h = self.resnets[0](torch.cat([hidden_states, skip * SKIP_SCALE], dim=1), temb)
        for block in self.more_resnets:
            h = block(h, temb)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states, encoder_attention_mask)
        return self.upsample(nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))


class EfficientCrossAttnUpBlock2D(EfficientUpBlock2D):
    has_cross_attention = True


for _kind, _cls in (("down", EfficientDownBlock2D), ("down", EfficientCrossAttnDownBlock2D),
                    ("up", EfficientUpBlock2D), ("up", EfficientCrossAttnUpBlock2D)):
    register_block(_kind, _cls.__name__)(_cls)
