"""Stable Diffusion XL (base 1.0 and refiner 1.0) as diffkern pipelines: diffusers' own
StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline, whose
UNet (diffkern UNet2DConditionModel with the "text_time" micro-conditioning), VAE (diffkern AutoencoderKL)
and scheduler (diffkern's class of the same name) run on diffkern's kernels. The two text encoders
(CLIP ViT-L and OpenCLIP bigG with projection) and tokenizers are transformers', as in diffusers.

    base = StableDiffusionXLPipeline.from_pretrained("stable-diffusion-xl-base-1.0",
                                                     torch_dtype=torch.float16)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        "stable-diffusion-xl-refiner-1.0", text_encoder_2=base.text_encoder_2, vae=base.vae,
        torch_dtype=torch.float16)
    latents = base(prompt, num_inference_steps=40, denoising_end=0.8, output_type="latent").images
    image = refiner(prompt, image=latents, num_inference_steps=40, denoising_start=0.8).images[0]

Every argument is diffusers' (prompt_2 / negative_prompt_2, original_size / crops_coords_top_left /
target_size and their negative_ forms, aesthetic_score for the refiner, denoising_start / denoising_end,
guidance_rescale, ...), and so is every result: the __call__ is diffusers'.
"""

from __future__ import annotations

import diffusers

from diffkern.pipelines.ldm._components import DiffkernComponentsMixin

__all__ = ["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
           "StableDiffusionXLInpaintPipeline"]


class StableDiffusionXLPipeline(DiffkernComponentsMixin, diffusers.StableDiffusionXLPipeline):
    """SDXL text-to-image (base; with denoising_end it hands partly denoised latents to the refiner)."""


class StableDiffusionXLImg2ImgPipeline(DiffkernComponentsMixin, diffusers.StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image, and the refiner (text_encoder=None, requires_aesthetics_score=True in its
    folder; denoising_start continues the base's latents)."""


class StableDiffusionXLInpaintPipeline(DiffkernComponentsMixin, diffusers.StableDiffusionXLInpaintPipeline):
    """SDXL inpainting: a 4-channel UNet (base / refiner, blending the known region back at every step)
    or a 9-channel inpainting UNet (masked-image latents and mask concatenated)."""
