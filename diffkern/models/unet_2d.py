"""The unconditional / class-conditional pixel UNet of diffusers (UNet2DModel), on diffkern ops: the
Karlo (unCLIP) 64 -> 256 super-resolution models are configs of it (6 input channels: noisy image +
upsampled low-resolution image; ResnetDownsampleBlock2D / ResnetUpsampleBlock2D; no attention).

UNet2DModel is diffusers' ModelMixin + ConfigMixin with diffusers' constructor (from_pretrained /
save_pretrained / from_config are diffusers' own) and exactly diffusers' state_dict keys. Supported:
DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D down blocks, UpBlock2D / AttnUpBlock2D /
ResnetUpsampleBlock2D up blocks (the DDPM default layout included), UNetMidBlock2D (with or without its self-attention) or none, "default"
and "scale_shift" (ADM) time conditioning, positional time embeddings, class embeddings of type
None / "identity" / "timestep" / num_class_embeds. The down and up blocks are the UNet family's
(diffkern.models.unet_blocks, shared with UNet2DConditionModel); every GroupNorm + SiLU (and the
scale-shift) is one fused diffkern GroupNorm call.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from diffkern.models._config import NoAttentionProcessors, check_options, defaults
from diffkern.models.unet_blocks import build_block
from diffkern.models.unet_blocks.cross_attn import Checkpointed, PixelSelfAttention, resnet
from diffkern.nn.group_norm import GroupNorm
from diffkern.nn.resnet import TimestepEmbedding, timestep_embedding

_NAME = "UNet2DModel"

FIXED = dict(time_embedding_type=("positional",), mid_block_type=("UNetMidBlock2D", None),
             downsample_type=("conv",), upsample_type=("conv",), act_fn=("silu", "swish", "gelu", "mish", "relu"),
             resnet_time_scale_shift=("default", "scale_shift"), class_embed_type=(None, "identity", "timestep"))
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")


class UNetMidBlock2D(Checkpointed, nn.Module):
    """diffusers' UNetMidBlock2D of the pixel UNet: resnet, (self-attention or nothing), resnet."""

    def __init__(self, ch, temb, *, add_attention, head_dim, attn_groups, output_scale_factor, **res):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(ch, ch, temb, output_scale_factor=output_scale_factor, **res)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([
            PixelSelfAttention(ch, head_dim, norm_num_groups=attn_groups, eps=res["resnet_eps"],
                               rescale_output_factor=output_scale_factor)]) if add_attention else None

    def forward(self, h, temb):
        h = self._run(self.resnets[0], h, temb)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self._run(self.resnets[1], h, temb)


class UNet2DModel(NoAttentionProcessors, ModelMixin, ConfigMixin):
    """Pixel-space UNet without text: eps prediction from a noisy image and a timestep.

    diffusers' ModelMixin + ConfigMixin with diffusers' constructor (arguments and defaults of 0.42);
    values this module does not implement (FIXED, block types outside DOWN_TYPES / UP_TYPES) raise
    ValueError naming the option.

    forward(sample (B, in_channels, H, W), timestep, class_labels=None, return_dict=True)
    -> UNet2DOutput (or a 1-tuple). timestep: a number (read as an integer, as diffusers does), a 0-d
    tensor or a (B,) tensor. class_labels: the (B, time_embed_dim) embedding for class_embed_type
    "identity" (added to the time embedding), timesteps for "timestep", indices for num_class_embeds.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(self, sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
                 time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 mid_block_type="UNetMidBlock2D",
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
                 downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
                 attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
                 resnet_time_scale_shift="default", add_attention=True, class_embed_type=None, num_class_embeds=None,
                 num_train_timesteps=None):
        super().__init__()
        cfg = self.config
        check_options(_NAME, cfg, FIXED)
        ch = list(cfg.block_out_channels)
        levels = len(ch)
        if len(cfg.down_block_types) != levels or len(cfg.up_block_types) != levels:
            raise ValueError(f"{_NAME}: down_block_types, up_block_types and block_out_channels must have the "
                             f"same length, got {len(cfg.down_block_types)}, {len(cfg.up_block_types)}, {levels}")
        for key, types, allowed in (("down_block_types", cfg.down_block_types, DOWN_TYPES),
                                    ("up_block_types", cfg.up_block_types, UP_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{_NAME}: {key} {bad} are not supported (supported: {', '.join(allowed)})")
        if cfg.norm_num_groups is None:
            raise ValueError(f"{_NAME}: norm_num_groups=None is not supported")
        scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        if cfg.mid_block_type and cfg.add_attention and scale_shift and cfg.attn_norm_num_groups is None:
            raise ValueError(f"{_NAME}: add_attention with resnet_time_scale_shift='scale_shift' (a mid "
                             "attention without GroupNorm) is not supported")
        temb = cfg.time_embedding_dim or ch[0] * 4
        # diffusers' get_*_block argument names: the blocks are the UNet family's (diffkern.models.unet_blocks)
        res = dict(resnet_eps=cfg.norm_eps, resnet_groups=cfg.norm_num_groups, dropout=cfg.dropout,
                   resnet_time_scale_shift=cfg.resnet_time_scale_shift, resnet_act_fn=cfg.act_fn)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = None
        if cfg.class_embed_type is None and cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb)
        elif cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(ch[0], temb)
        elif cfg.class_embed_type == "identity":
            self.class_embedding = nn.Identity()

        self.down_blocks = nn.ModuleList([
            build_block("down", kind, num_layers=cfg.layers_per_block, in_channels=ch[max(i - 1, 0)],
                        out_channels=ch[i], temb_channels=temb, add_downsample=i < levels - 1,
                        downsample_padding=cfg.downsample_padding,
                        attention_head_dim=cfg.attention_head_dim or ch[i], **res)
            for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = None
        if cfg.mid_block_type is not None:
            head_dim = cfg.attention_head_dim if cfg.attention_head_dim is not None else ch[-1]
            attn_groups = cfg.attn_norm_num_groups or (None if scale_shift else cfg.norm_num_groups)
            self.mid_block = UNetMidBlock2D(ch[-1], temb, add_attention=cfg.add_attention, head_dim=head_dim,
                                  attn_groups=attn_groups, output_scale_factor=cfg.mid_block_scale_factor, **res)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            build_block("up", kind, num_layers=cfg.layers_per_block + 1, in_channels=rev[min(i + 1, levels - 1)],
                        prev_output_channel=rev[max(i - 1, 0)], out_channels=rev[i], temb_channels=temb,
                        add_upsample=i < levels - 1, resolution_idx=i,
                        attention_head_dim=cfg.attention_head_dim or rev[i], **res)
            for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _time(self, t):
        cfg = self.config
        return timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  downscale_freq_shift=cfg.freq_shift).to(self.dtype)

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        cfg = self.config
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
            raise ValueError(f"{_NAME}: sample must be (B, {cfg.in_channels}, H, W), got {got}")
        B = sample.shape[0]
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = timestep
        if not isinstance(t, torch.Tensor):
            t = torch.tensor([t], dtype=torch.long, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        if t.dim() != 1 or t.shape[0] not in (1, B):
            raise ValueError(f"{_NAME}: timestep must be a number, a 0-d tensor or a (B={B},) tensor, "
                             f"got shape {tuple(t.shape)}")
        emb = self.time_embedding(self._time(t * torch.ones(B, dtype=t.dtype, device=t.device)))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"{_NAME}: class_labels are required (class_embed_type="
                                 f"{cfg.class_embed_type!r}, num_class_embeds={cfg.num_class_embeds})")
            if cfg.class_embed_type == "timestep":
                class_labels = self._time(class_labels)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError(f"{_NAME}: class_labels given but the model has no class embedding")

        # Sides that do not halve evenly: conv upsamplers are told their skip's size (ours, not
        # diffusers', which fails there); resnet upsamplers always double, as diffusers'.
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        for i, block in enumerate(self.up_blocks):
            level = tuple(skips[len(skips) - len(block.resnets):])
            del skips[len(skips) - len(block.resnets):]
            size = skips[-1].shape[2:] if skips else None
            if size is not None and tuple(size) == (2 * h.shape[2], 2 * h.shape[3]):
                size = None  # the plain x2 path, bit for bit diffusers'
            h = block(h, level, emb, upsample_size=size)
        out = self.conv_out(self.conv_norm_out(h))
        return UNet2DOutput(sample=out) if return_dict else (out,)


DEFAULTS = defaults(UNet2DModel)  # diffusers' constructor defaults (what a config.json leaves out)
