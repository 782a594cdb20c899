"""GLIDE (Nichol et al. 2021): OpenAI's ADM UNet with a text transformer, loading OpenAI's checkpoints.

- create_model(**options): the base, upsampler and inpainting models from OpenAI's option names;
  model_and_diffusion_defaults() / model_and_diffusion_defaults_upsampler() give the released ones.
- Text2ImUNet, UNetModel: the models; blocks (ResBlock, AttentionBlock, ...) and text (Transformer)
  hold the pieces, all with OpenAI's state-dict keys.
"""

from diffkern.models.glide.model_creation import (create_model, model_and_diffusion_defaults,
                                                  model_and_diffusion_defaults_upsampler)
from diffkern.models.glide.unet import Text2ImUNet, UNetModel

__all__ = ["create_model", "model_and_diffusion_defaults", "model_and_diffusion_defaults_upsampler",
           "Text2ImUNet", "UNetModel"]
