"""The UNet blocks under diffusers' module name (diffusers.models.unets.unet_2d_blocks); they live in
diffkern.models.unet_blocks, one file per block family, behind a registry other families extend."""

from diffkern.models.unet_blocks import *  # noqa: F401,F403
from diffkern.models.unet_blocks import __all__  # noqa: F401
