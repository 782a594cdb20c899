"""GLIDE (Nichol et al. 2021): OpenAI's ADM UNet with a text transformer, loading OpenAI's checkpoints.

- create_model(**options): the base, upsampler and inpainting models from OpenAI's option names;
  model_and_diffusion_defaults() / model_and_diffusion_defaults_upsampler() give the released ones.
- Text2ImUNet, UNetModel: the models; blocks (ResBlock, AttentionBlock, ...) and text (Transformer)
  hold the pieces, all with OpenAI's state-dict keys.
- create_gaussian_diffusion(steps, noise_schedule, timestep_respacing): OpenAI's schedules and
  respacing on diffkern.schedulers (DDPM with learned-range variance, DDIM, DDIM inversion),
  classifier-free guidance on the eps channels, cond_fn (CLIP) guidance.
- create_clip_model(): GLIDE's noised CLIP (clip_image_enc.pt / clip_text_enc.pt layouts).
- GlideTokenizer (GPT-2 BPE of the UNets), ClipTokenizer (CLIP BPE of the noised CLIP).
"""

from diffkern.models.glide.model_creation import (create_model, model_and_diffusion_defaults,
                                                  model_and_diffusion_defaults_upsampler)
from diffkern.models.glide.unet import Text2ImUNet, UNetModel
from diffkern.models.glide.diffusion import (GaussianDiffusion, create_gaussian_diffusion, get_named_beta_schedule,
                                             guided_model_fn)
from diffkern.models.glide.clip import CLIP_CONFIG, NoisedCLIP, create_clip_model
from diffkern.models.glide.tokenizer import ClipTokenizer, GlideTokenizer, load_glide_tokenizer

__all__ = ["create_model", "model_and_diffusion_defaults", "model_and_diffusion_defaults_upsampler",
           "Text2ImUNet", "UNetModel", "GaussianDiffusion", "create_gaussian_diffusion", "get_named_beta_schedule",
           "guided_model_fn", "CLIP_CONFIG", "NoisedCLIP", "create_clip_model", "ClipTokenizer", "GlideTokenizer",
           "load_glide_tokenizer"]
