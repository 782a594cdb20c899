"""Imagen's family-only parts: the Efficient U-Net block types (registered with the UNet's block
registry on import) and the paper's model presets (base 64: 2B, SR 256: 600M, SR 1024: 400M)."""

from diffkern.models.imagen.blocks import (EfficientCrossAttnDownBlock2D, EfficientCrossAttnUpBlock2D,
                                           EfficientDownBlock2D, EfficientUpBlock2D)
from diffkern.models.imagen.presets import (BUDGETS, efficient_unet_config, imagen_unet, parameter_count,
                                            preset_config)

__all__ = ["EfficientDownBlock2D", "EfficientCrossAttnDownBlock2D", "EfficientUpBlock2D",
           "EfficientCrossAttnUpBlock2D", "BUDGETS", "efficient_unet_config", "imagen_unet",
           "parameter_count", "preset_config"]
