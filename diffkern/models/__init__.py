"""Diffusion models on diffkern ops, state-dict compatible with the released checkpoints.

The diffusers-layout models stand on diffusers: ModelMixin + ConfigMixin subclasses with diffusers'
constructors, keys and output classes (save_pretrained / from_pretrained / from_config are diffusers' own);
their blocks call diffkern.nn / diffkern.ops. diffusers is a required import of this package.

- UNet2DConditionModel: the LDM / Stable Diffusion 1.x-2.x / SDXL / IF / unCLIP-decoder UNet.
- AutoencoderKL: the LDM / SD KL autoencoder (DiagonalGaussianDistribution is diffusers').
- UNet2DModel: diffusers' pixel UNet (the Karlo / unCLIP super-resolution models, DDPM layouts).
- unclip: PriorTransformer and UnCLIPTextProjModel of DALL-E 2 / Karlo (diffkern.models.unclip).
- from_diffusers: convert an instantiated diffusers UNet2DConditionModel / AutoencoderKL.
- load: diffusers pipeline / component folders and CompVis / Stability single files (loading.py).
- glide: GLIDE's ADM UNet, text transformer and diffusion (diffkern.models.glide).
- imagen: Imagen's Efficient U-Net block types (registered on import) and presets; t5: IF's T5 encoder helpers;
  checkpoints.deepfloyd: original DeepFloyd IF checkpoints.
"""

from diffkern.models.autoencoder_kl import AutoencoderKL, DiagonalGaussianDistribution
from diffkern.models.diffusers_compat import from_diffusers
from diffkern.models.unet_2d import UNet2DModel
from diffkern.models.unet_2d_condition import UNet2DConditionModel
from diffkern.models.unclip import PriorTransformer, UnCLIPTextProjModel
from diffkern.models import imagen  # noqa: F401  (registers the Efficient U-Net block types)
from diffkern.models.imagen import imagen_unet
from diffkern.models.t5 import encode_t5, load_t5, load_t5_tokenizer

from diffkern.models.loading import CheckpointError, load

__all__ = ["UNet2DConditionModel", "AutoencoderKL", "DiagonalGaussianDistribution", "from_diffusers", "load",
           "CheckpointError", "UNet2DModel", "PriorTransformer", "UnCLIPTextProjModel", "imagen", "imagen_unet",
           "encode_t5", "load_t5", "load_t5_tokenizer"]
