"""The blocks of the LDM / Stable Diffusion / SDXL UNet: diffusers' DownBlock2D, CrossAttnDownBlock2D,
UNetMidBlock2DCrossAttn, UNetMidBlock2D, UpBlock2D and CrossAttnUpBlock2D (names, keys, maths).

Also AttnDownBlock2D / AttnUpBlock2D (pixel self-attention after each resnet: UNet2DModel's DDPM layout).
Each block owns `resnets` (ResnetBlock2D), optionally `attentions` (Transformer2DModel, one after
each resnet) and `downsamplers` / `upsamplers` (a one-element ModuleList, as diffusers nests them).
Built through the registry with diffusers' get_*_block keyword arguments (see registry.py).
"""

from __future__ import annotations

import torch
from torch import nn

from diffkern.models.unet_blocks.registry import register_block
from diffkern.nn.attention import Attention
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffkern.nn.transformer import SpatialSelfAttention, SpatialTransformer


def resnet(in_channels, out_channels, temb_channels, *, resnet_eps=1e-6, resnet_groups=32, dropout=0.0,
           resnet_time_scale_shift="default", resnet_act_fn="swish", output_scale_factor=1.0,
           skip_time_act=False, up=False, down=False):
    """ResnetBlock2D from get_*_block argument names (shared by every block file)."""
    return ResnetBlock2D(in_channels, out_channels, temb_channels, groups=resnet_groups, eps=resnet_eps,
                         dropout=dropout, output_scale_factor=output_scale_factor, act_fn=resnet_act_fn,
                         time_embedding_norm=resnet_time_scale_shift, skip_time_act=skip_time_act, up=up,
                         down=down)


class Checkpointed:
    """diffusers' gradient-checkpointing switch: ModelMixin.enable_gradient_checkpointing() sets
    `gradient_checkpointing` and `_gradient_checkpointing_func` on every module that has the attribute;
    such a module runs its sub-modules through `_run`, which recomputes them in the backward pass."""

    gradient_checkpointing = False

    def _run(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


def fourier_filter(x, threshold, scale):
    """FreeU's low-frequency scaling: the centred (2 threshold)^2 frequencies of x times `scale`
    (diffusers' fourier_filter; the FFT runs in float32, the result comes back in x's dtype)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    H, W = freq.shape[-2:]
    mask = torch.ones(freq.shape, device=x.device)
    mask[..., H // 2 - threshold:H // 2 + threshold, W // 2 - threshold:W // 2 + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(x.dtype)


def freeu(resolution_idx, h, skip, s1, s2, b1, b2):
    """FreeU (Si et al. 2023) on the first two up levels: the backbone's first half of channels times
    b, the skip's low frequencies times s (diffusers' apply_freeu, without its in-place write)."""
    if resolution_idx not in (0, 1):
        return h, skip
    b, s = (b1, s1) if resolution_idx == 0 else (b2, s2)
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * b, h[:, half:]], dim=1), fourier_filter(skip, threshold=1, scale=s)


def _per_layer(depth, num_layers):
    return list(depth) if isinstance(depth, (list, tuple)) else [depth] * num_layers


class PixelSelfAttention(SpatialSelfAttention):
    """SpatialSelfAttention with diffusers' head arithmetic of the pixel UNet's attention (AttnDownBlock2D,
    AttnUpBlock2D, UNetMidBlock2D): channels // head_dim heads of head_dim, so the inner width may be
    narrower than the channels (e.g. 8 channels, head_dim 3: 2 heads, inner width 6)."""

    def __init__(self, channels, head_dim, *, norm_num_groups=32, eps=1e-6, rescale_output_factor=1.0):
        if not 0 < head_dim <= channels:
            raise ValueError(f"attention_head_dim {head_dim} must be in [1, {channels}] (the channels)")
        Attention.__init__(self, channels, heads=channels // head_dim, dim_head=head_dim, qkv_bias=True,
                           out_bias=True)
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, channels, eps=eps)


class Transformer2DModel(Checkpointed, SpatialTransformer):
    """diffkern's SpatialTransformer under diffusers' module name in the UNet blocks, with diffusers'
    gradient-checkpointing switch (its whole call is recomputed in the backward pass)."""

    def forward(self, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(super().forward, *args)
        return super().forward(*args)


class _Level(Checkpointed, nn.Module):
    """`num_layers` resnets, each followed by a Transformer2DModel when `cross_attention`, or by a
    pixel self-attention when `self_attention` (diffusers' AttnDownBlock2D / AttnUpBlock2D)."""

    self_attention = False

    def _build(self, in_channels_per_layer, out_channels, temb_channels, num_layers, cross_attention, kw):
        res_kw = {k: kw[k] for k in ("resnet_eps", "resnet_groups", "dropout", "resnet_time_scale_shift",
                                     "resnet_act_fn") if k in kw}
        self.resnets = nn.ModuleList([resnet(in_channels_per_layer(i), out_channels, temb_channels, **res_kw)
                                      for i in range(num_layers)])
        self.has_cross_attention = cross_attention
        self.attentions = None
        if cross_attention:
            heads = kw["num_attention_heads"]
            depth = _per_layer(kw.get("transformer_layers_per_block", 1), num_layers)
            # diffusers' convention: the head width is whatever the channels leave per head.
            self.attentions = nn.ModuleList([
                Transformer2DModel(heads, out_channels // heads, out_channels, kw["cross_attention_dim"],
                                   depth=depth[i], norm_num_groups=kw.get("resnet_groups", 32),
                                   use_linear_projection=kw.get("use_linear_projection", False),
                                   dropout=kw.get("dropout", 0.0),
                                   only_cross_attention=kw.get("only_cross_attention", False))
                for i in range(num_layers)])
        elif self.self_attention:  # UNet2DModel's AttnDownBlock2D / AttnUpBlock2D (diffusers' arguments)
            head_dim = kw.get("attention_head_dim") or out_channels
            self.attentions = nn.ModuleList([
                PixelSelfAttention(out_channels, head_dim, norm_num_groups=kw.get("resnet_groups", 32),
                                   eps=kw.get("resnet_eps", 1e-6))
                for _ in range(num_layers)])

    def _attend(self, i, h, context, attention_mask, encoder_attention_mask):
        if self.attentions is None:
            return h
        if not self.has_cross_attention:
            return self.attentions[i](h)
        return self.attentions[i](h, context, attention_mask, encoder_attention_mask)


class DownBlock2D(_Level):
    """CrossAttnDownBlock2D (with transformers) or DownBlock2D: resnet (+ transformer) x num_layers,
    then a stride-2 Downsample2D when add_downsample. Returns (h, skips): every layer's output."""

    cross_attention = False

    def __init__(self, *, in_channels, out_channels, temb_channels, num_layers=1, add_downsample=True,
                 downsample_padding=1, **kw):
        super().__init__()
        self._build(lambda i: in_channels if i == 0 else out_channels, out_channels, temb_channels, num_layers,
                    self.cross_attention, kw)
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, out_channels,
                                                            padding=downsample_padding)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None, additional_residuals=None):
        h, skips = hidden_states, ()
        for i, block in enumerate(self.resnets):
            h = self._attend(i, self._run(block, h, temb), encoder_hidden_states, attention_mask,
                             encoder_attention_mask)
            if i == len(self.resnets) - 1 and additional_residuals is not None:  # T2I-adapter, diffusers' place
                h = h + additional_residuals
            skips += (h,)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips += (h,)
        return h, skips


class CrossAttnDownBlock2D(DownBlock2D):
    cross_attention = True


class AttnDownBlock2D(DownBlock2D):
    self_attention = True


class UNetMidBlock2DCrossAttn(Checkpointed, nn.Module):
    """resnet, then (transformer, resnet) x num_layers, at constant width (diffusers' mid blocks;
    cross_attention=False with num_layers=0 is UNetMidBlock2D without attention)."""

    cross_attention = True

    def __init__(self, *, in_channels, temb_channels, num_layers=1, resnet_groups=None, output_scale_factor=1.0,
                 **kw):
        super().__init__()
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        res_kw = {k: kw[k] for k in ("resnet_eps", "dropout", "resnet_time_scale_shift", "resnet_act_fn")
                  if k in kw}
        layers = num_layers if self.cross_attention else 0
        self.has_cross_attention = self.cross_attention
        self.resnets = nn.ModuleList([
            resnet(in_channels, in_channels, temb_channels, resnet_groups=groups,
                   output_scale_factor=output_scale_factor, **res_kw)
            for _ in range(layers + 1)])
        depth = _per_layer(kw.get("transformer_layers_per_block", 1), layers)
        heads = kw.get("num_attention_heads", 1)
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, in_channels // heads, in_channels, kw["cross_attention_dim"],
                               depth=depth[i], norm_num_groups=groups,
                               use_linear_projection=kw.get("use_linear_projection", False),
                               dropout=kw.get("dropout", 0.0))
            for i in range(layers)])

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None):
        h = self._run(self.resnets[0], hidden_states, temb)
        for attn, block in zip(self.attentions, self.resnets[1:]):
            h = attn(h, encoder_hidden_states, attention_mask, encoder_attention_mask)
            h = self._run(block, h, temb)
        return h


class UNetMidBlock2D(UNetMidBlock2DCrossAttn):
    """diffusers' UNetMidBlock2D as the UNet2DConditionModel builds it (add_attention=False): one resnet."""

    cross_attention = False


class UpBlock2D(_Level):
    """CrossAttnUpBlock2D (with transformers) or UpBlock2D: (concat a skip, resnet (+ transformer))
    x num_layers, then nearest x2 + conv when add_upsample.

    The first resnet takes the previous level's output (prev_output_channel) and the last one the
    skip from the level below (in_channels); the others see out_channels + out_channels.
    """

    cross_attention = False

    def __init__(self, *, in_channels, prev_output_channel, out_channels, temb_channels, num_layers=1,
                 add_upsample=True, **kw):
        super().__init__()

        def resnet_in(i):
            skip = in_channels if i == num_layers - 1 else out_channels
            return (prev_output_channel if i == 0 else out_channels) + skip

        self._build(resnet_in, out_channels, temb_channels, num_layers, self.cross_attention, kw)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None
        self.resolution_idx = kw.get("resolution_idx")
        self.s1 = self.s2 = self.b1 = self.b2 = None  # FreeU factors: UNet2DConditionModel.enable_freeu

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, encoder_hidden_states=None,
                cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None):
        h, skips = hidden_states, tuple(res_hidden_states_tuple)
        use_freeu = bool(self.s1 and self.s2 and self.b1 and self.b2)
        for i, block in enumerate(self.resnets):
            skip, skips = skips[-1], skips[:-1]
            if use_freeu:
                h, skip = freeu(self.resolution_idx, h, skip, self.s1, self.s2, self.b1, self.b2)
            h = self._run(block, torch.cat([h, skip], dim=1), temb)
            h = self._attend(i, h, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


class CrossAttnUpBlock2D(UpBlock2D):
    cross_attention = True


class AttnUpBlock2D(UpBlock2D):
    self_attention = True


for _kind, _cls in (("down", DownBlock2D), ("down", CrossAttnDownBlock2D), ("down", AttnDownBlock2D),
                    ("mid", UNetMidBlock2DCrossAttn), ("mid", UNetMidBlock2D), ("up", UpBlock2D),
                    ("up", CrossAttnUpBlock2D), ("up", AttnUpBlock2D)):
    register_block(_kind, _cls.__name__)(_cls)
