"""The blocks of the diffusers-layout UNet, by diffusers' block-type name (see registry.py).

Registered here: DownBlock2D, CrossAttnDownBlock2D, AttnDownBlock2D, AttnUpBlock2D, ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D;
UNetMidBlock2DCrossAttn, UNetMidBlock2D, UNetMidBlock2DSimpleCrossAttn; UpBlock2D, CrossAttnUpBlock2D,
ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D. Other families register theirs with register_block.
"""

from diffkern.models.unet_blocks.registry import block_types, build_block, register_block
from diffkern.models.unet_blocks.cross_attn import (AttnDownBlock2D, AttnUpBlock2D, CrossAttnDownBlock2D,
                                                    CrossAttnUpBlock2D, DownBlock2D, Transformer2DModel,
                                                    UNetMidBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D)
from diffkern.models.unet_blocks.simple_cross_attn import (ResnetDownsampleBlock2D, ResnetUpsampleBlock2D,
                                                           SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D,
                                                           UNetMidBlock2DSimpleCrossAttn)

__all__ = ["register_block", "build_block", "block_types", "DownBlock2D", "CrossAttnDownBlock2D",
           "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2D",
           "UNetMidBlock2DSimpleCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
           "SimpleCrossAttnUpBlock2D", "AttnDownBlock2D", "AttnUpBlock2D", "Transformer2DModel"]
