"""The Latent Diffusion release as diffkern pipelines on diffusers' pipeline classes.

- LDMPipeline: unconditional LDMs (CelebA-HQ, FFHQ, LSUN churches / bedrooms) with a VQ or KL autoencoder.
- LDMSuperResolutionPipeline: the 4x super-resolution LDM (low-resolution image concatenated to the latent).
- LDMClassConditionalPipeline: the class-conditional ImageNet LDM (cin256) with classifier-free guidance.
- LDMInpaintPipeline: the LDM inpainting model (masked-image latent and mask concatenated to the latent).

Each is diffusers' pipeline of the same name (its __call__, from_pretrained, save_pretrained) running
diffkern's UNet, VQModel / AutoencoderKL and scheduler; see diffkern.pipelines.ldm._components.
"""

from diffkern.pipelines.ldm._components import DiffkernComponentsMixin
from diffkern.pipelines.ldm.class_conditional import ClassEmbedder, LDMClassConditionalPipeline
from diffkern.pipelines.ldm.inpaint import LDMInpaintPipeline
from diffkern.pipelines.ldm.unconditional import LDMPipeline, LDMSuperResolutionPipeline

__all__ = ["ClassEmbedder", "DiffkernComponentsMixin", "LDMClassConditionalPipeline", "LDMInpaintPipeline",
           "LDMPipeline",
           "LDMSuperResolutionPipeline"]
