"""Imagen's model budgets as diffkern UNet2DConditionModel configs (Saharia et al. 2022, Appendix F).

    unet = imagen_unet("imagen-sr-256", device="meta")     # ~600M parameters, Efficient U-Net

- "imagen-base-64": the 64 x 64 text-to-image base, 2B parameters: an ADM / IF-style U-Net
  (512-ish channels x (1, 2, 3, 4), 3 resnets per level, text cross-attention and self-attention at
  32, 16 and 8, T5-XXL pooled into the time embedding), learned-range variance (6 output channels).
- "imagen-sr-256": the 64 -> 256 Efficient U-Net, 600M: channels (128, 256, 512, 1024), more resnets
  at low resolution, text cross-attention (no self-attention) at the lowest level only, the
  noise-augmentation level as a timestep class embedding.
- "imagen-sr-1024": the 256 -> 1024 Efficient U-Net, 400M: the same shape with fewer low-resolution
  resnets.
The paper gives budgets, not every width: the channel counts follow it and the resnet counts are
chosen so that the parameter counts land within 3% of the budgets (2.03B, 599M, 408M; checked in
tests/models/imagen).
"""

from __future__ import annotations

import torch

import diffkern.models.imagen.blocks  # noqa: F401  (registers the Efficient U-Net block types)

T5_XXL_WIDTH = 4096
BUDGETS = {"imagen-base-64": 2.0e9, "imagen-sr-256": 600e6, "imagen-sr-1024": 400e6}

_TEXT = dict(encoder_hid_dim=T5_XXL_WIDTH, addition_embed_type="text", addition_embed_type_num_heads=64,
             cross_attention_norm="group_norm")


def efficient_unet_config(block_out_channels, layers_per_block, attention_levels, *, sample_size,
                          in_channels=6, out_channels=3, cross_attention_dim=1024, attention_head_dim=64,
                          only_cross_attention=True, **overrides):
    """An Efficient U-Net config: every level an Efficient(CrossAttn)Down/UpBlock2D, attention at the
    levels in `attention_levels` (0 = highest resolution), no mid block, noise level as class
    embedding, T5 text pooled into the time embedding and projected for the cross-attention."""
    n = len(block_out_channels)
    down = ["EfficientCrossAttnDownBlock2D" if i in attention_levels else "EfficientDownBlock2D"
            for i in range(n)]
    up = ["EfficientCrossAttnUpBlock2D" if n - 1 - i in attention_levels else "EfficientUpBlock2D"
          for i in range(n)]
    config = dict(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                  block_out_channels=list(block_out_channels), layers_per_block=list(layers_per_block),
                  down_block_types=down, up_block_types=up, mid_block_type=None,
                  cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                  class_embed_type="timestep", resnet_time_scale_shift="scale_shift", act_fn="silu",
                  only_cross_attention=only_cross_attention, **_TEXT)
    config.update(overrides)
    return config


def preset_config(name):
    """The UNet2DConditionModel config of an Imagen preset (see the module docstring)."""
    if name == "imagen-base-64":
        ch = 480  # x (1, 2, 3, 4): head width 32 divides every level
        return dict(sample_size=64, in_channels=3, out_channels=6,
                    block_out_channels=[ch, 2 * ch, 3 * ch, 4 * ch], layers_per_block=3,
                    down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
                    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                    up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
                    cross_attention_dim=4 * ch, attention_head_dim=32, resnet_time_scale_shift="scale_shift",
                    act_fn="gelu", **_TEXT)
    if name == "imagen-sr-256":
        return efficient_unet_config([128, 256, 512, 1024], [2, 4, 8, 10], {3}, sample_size=256)
    if name == "imagen-sr-1024":
        return efficient_unet_config([128, 256, 512, 1024], [2, 4, 5, 6], {3}, sample_size=1024)
    raise ValueError(f"preset: unknown Imagen preset {name!r}; valid: {', '.join(BUDGETS)}")


def imagen_unet(name, *, device=None, dtype=None, **overrides):
    """Build a preset's UNet2DConditionModel (randomly initialised; device="meta" allocates nothing)."""
    from diffkern.models.unet_2d_condition import UNet2DConditionModel

    config = dict(preset_config(name), **overrides)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype) if dtype is not None else unet


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())
