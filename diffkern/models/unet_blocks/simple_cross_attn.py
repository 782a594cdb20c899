"""The ADM-style blocks of the DeepFloyd IF UNets and the unCLIP (Karlo) decoder: diffusers'
ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D, UNetMidBlock2DSimpleCrossAttn,
ResnetUpsampleBlock2D and SimpleCrossAttnUpBlock2D (names, keys, maths).

They differ from the SD blocks in three ways: resampling is a resnet with down=True / up=True
(average pooling / nearest x2 inside the residual block, conditioned on temb), attention is
AddedKVAttention (text keys and values placed before the pixels' own, on ops.attention's kv_prefix),
and every resnet takes resnet_out_scale_factor / resnet_skip_time_act. Head width: attention_head_dim,
heads = channels // attention_head_dim.

Masks (diffusers' rule, kept for the unCLIP decoder, which passes its text mask as `attention_mask`):
attention_mask when given, else encoder_attention_mask when there is text.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkern.models.unet_blocks.cross_attn import Checkpointed, resnet
from diffkern.models.unet_blocks.registry import register_block
from diffkern.nn.attention import AddedKVAttention

_RES_KEYS = ("resnet_eps", "resnet_groups", "dropout", "resnet_time_scale_shift", "resnet_act_fn")


def _res_kw(kw, output_scale_factor):
    out = {k: kw[k] for k in _RES_KEYS if k in kw}
    return dict(out, output_scale_factor=output_scale_factor, skip_time_act=kw.get("resnet_skip_time_act", False))


def _attention(channels, kw, only_cross_attention):
    head_dim = kw.get("attention_head_dim") or 1
    if channels % head_dim:
        raise ValueError(f"attention_head_dim {head_dim} must divide the block's channels {channels}")
    return AddedKVAttention(channels, channels // head_dim, head_dim, kw["cross_attention_dim"],
                            norm_num_groups=kw.get("resnet_groups", 32), only_cross_attention=only_cross_attention,
                            cross_attention_norm=kw.get("cross_attention_norm"), dropout=0.0)


def _mask(attention_mask, encoder_hidden_states, encoder_attention_mask):
    if attention_mask is not None:
        return attention_mask
    return None if encoder_hidden_states is None else encoder_attention_mask


class ResnetDownsampleBlock2D(Checkpointed, nn.Module):
    """resnet (+ added-KV attention) x num_layers, then a down=True resnet when add_downsample."""

    has_cross_attention = False

    def __init__(self, *, in_channels, out_channels, temb_channels, num_layers=1, add_downsample=True,
                 resnet_out_scale_factor=1.0, **kw):
        super().__init__()
        res_kw = _res_kw(kw, resnet_out_scale_factor)
        self.resnets = nn.ModuleList([resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels,
                                             **res_kw) for i in range(num_layers)])
        self.attentions = None
        if self.has_cross_attention:
            self.attentions = nn.ModuleList([_attention(out_channels, kw, kw.get("only_cross_attention", False))
                                             for _ in range(num_layers)])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([resnet(out_channels, out_channels, temb_channels, down=True,
                                                      **res_kw)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None, additional_residuals=None):
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        h, skips = hidden_states, ()
        for i, block in enumerate(self.resnets):
            h = self._run(block, h, temb)
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, encoder_hidden_states, mask)
            skips += (h,)
        if self.downsamplers is not None:
            h = self._run(self.downsamplers[0], h, temb)
            skips += (h,)
        return h, skips


class SimpleCrossAttnDownBlock2D(ResnetDownsampleBlock2D):
    has_cross_attention = True


class UNetMidBlock2DSimpleCrossAttn(Checkpointed, nn.Module):
    """resnet, then (added-KV attention, resnet) x num_layers (mid_block_scale_factor on every resnet)."""

    has_cross_attention = True

    def __init__(self, *, in_channels, temb_channels, num_layers=1, resnet_groups=None, output_scale_factor=1.0,
                 mid_block_only_cross_attention=False, **kw):
        super().__init__()
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        kw = dict(kw, resnet_groups=groups)
        res_kw = _res_kw(kw, output_scale_factor)
        self.resnets = nn.ModuleList([resnet(in_channels, in_channels, temb_channels, **res_kw)
                                      for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList([_attention(in_channels, kw, bool(mid_block_only_cross_attention))
                                         for _ in range(num_layers)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None):
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        h = self._run(self.resnets[0], hidden_states, temb)
        for attn, block in zip(self.attentions, self.resnets[1:]):
            h = self._run(block, self._run(attn, h, encoder_hidden_states, mask), temb)
        return h


class ResnetUpsampleBlock2D(Checkpointed, nn.Module):
    """(concat a skip, resnet (+ added-KV attention)) x num_layers, then an up=True resnet when
    add_upsample (which doubles the size: diffusers gives it no upsample_size)."""

    has_cross_attention = False

    def __init__(self, *, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=1,
                 add_upsample=True, resnet_out_scale_factor=1.0, **kw):
        super().__init__()
        res_kw = _res_kw(kw, resnet_out_scale_factor)

        def resnet_in(i):
            skip = in_channels if i == num_layers - 1 else out_channels
            return (prev_output_channel if i == 0 else out_channels) + skip

        self.resnets = nn.ModuleList([resnet(resnet_in(i), out_channels, temb_channels, **res_kw)
                                      for i in range(num_layers)])
        self.attentions = None
        if self.has_cross_attention:
            self.attentions = nn.ModuleList([_attention(out_channels, kw, kw.get("only_cross_attention", False))
                                             for _ in range(num_layers)])
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([resnet(out_channels, out_channels, temb_channels, up=True, **res_kw)])

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):
        mask = _mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        h, skips = hidden_states, tuple(res_hidden_states_tuple)
        for i, block in enumerate(self.resnets):
            h = self._run(block, torch.cat([h, skips[-1]], dim=1), temb)
            skips = skips[:-1]
            if self.attentions is not None:
                h = self._run(self.attentions[i], h, encoder_hidden_states, mask)
        if self.upsamplers is not None:
            h = self._run(self.upsamplers[0], h, temb)
        return h


class SimpleCrossAttnUpBlock2D(ResnetUpsampleBlock2D):
    has_cross_attention = True


for _kind, _cls in (("down", ResnetDownsampleBlock2D), ("down", SimpleCrossAttnDownBlock2D),
                    ("mid", UNetMidBlock2DSimpleCrossAttn), ("up", ResnetUpsampleBlock2D),
                    ("up", SimpleCrossAttnUpBlock2D)):
    register_block(_kind, _cls.__name__)(_cls)
