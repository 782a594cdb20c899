"""Unconditional and 4x super-resolution Latent Diffusion: diffusers' LDMPipeline and
LDMSuperResolutionPipeline with diffkern's UNet2DModel, VQModel (or AutoencoderKL) and scheduler.

    pipe = LDMPipeline.from_pretrained("ldm-celebahq-256")          # a diffusers folder
    image = pipe(num_inference_steps=200, generator=torch.Generator().manual_seed(0)).images[0]
    sr = LDMSuperResolutionPipeline.from_pretrained("ldm-super-resolution-4x-openimages")
    big = sr(low_res_pil, num_inference_steps=100, eta=1.0).images[0]

Arguments, outputs and results are diffusers' (the __call__ is theirs). As in diffusers, LDMPipeline
draws its initial latents on the CPU from `generator` and a DDIM eta > 0 from the global RNG.
"""

from __future__ import annotations

import diffusers

from diffkern.pipelines.ldm._components import DiffkernComponentsMixin

__all__ = ["LDMPipeline", "LDMSuperResolutionPipeline"]


class LDMPipeline(DiffkernComponentsMixin, diffusers.LDMPipeline):
    """diffusers' LDMPipeline(vqvae, unet, scheduler) on diffkern components: vqvae a diffkern VQModel
    (or AutoencoderKL), unet a diffkern UNet2DModel, scheduler a diffkern scheduler."""


class LDMSuperResolutionPipeline(DiffkernComponentsMixin, diffusers.LDMSuperResolutionPipeline):
    """diffusers' LDMSuperResolutionPipeline(vqvae, unet, scheduler) on diffkern components: the UNet
    takes 2 * latent channels (noisy latent + the low-resolution image, concatenated), the VQModel
    decodes the latent at 4x the input's size."""
