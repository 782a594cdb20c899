"""Latent Diffusion text-to-image (CompVis/ldm-text2im-large-256): LDM-BERT + KL autoencoder + UNet.

    pipe = LDMTextToImagePipeline.from_pretrained("ldm-text2im-large-256")
    image = pipe("a painting of a squirrel eating a burger", guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(0)).images[0]

Follows diffusers' LDMTextToImagePipeline: the prompt is tokenized to the bert's 77 positions
without an attention mask, guidance runs whenever guidance_scale != 1 against the embedding of
"" (or `negative_prompt`), latents are divided by the autoencoder's scaling_factor before decoding,
and there is no safety checker. Differences: the generator is also handed to the scheduler's step
(diffusers' LDM pipeline draws DDIM eta > 0 / DDPM noise from the global RNG, so only eta = 0 DDIM
runs are comparable seed for seed), and latents are H/f x W/f for the autoencoder's real downscale f
(diffusers hard-codes 8, which every released LDM autoencoder has).
"""

from __future__ import annotations

import torch

from diffkern.pipelines.stable_diffusion import LatentDiffusionPipelineBase


class LDMTextToImagePipeline(LatentDiffusionPipelineBase):
    """Text-to-image with the LDM text2im model; components as StableDiffusionPipeline's, with
    text_encoder a diffkern LDMBertModel (diffusers calls it `bert`, the autoencoder `vqvae`) and a
    transformers BertTokenizer."""

    @property
    def bert(self):
        return self.text_encoder

    @property
    def vqvae(self):
        return self.vae

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps=50, guidance_scale=1.0,
                 height=None, width=None, num_images_per_prompt=1, generator=None, latents=None, eta=0.0,
                 output_type="pil", progress=None, callback=None):
        """Generate images for `prompt` (a str or a list of str).

        guidance_scale defaults to 1.0 (no guidance), as diffusers'; the model card samples with 6.
        negative_prompt replaces the unconditional "" (diffusers' LDM pipeline has no such option).
        The other arguments are StableDiffusionPipeline's (no clip_skip).
        """
        max_length = getattr(self.text_encoder.config, "max_position_embeddings", 77)
        return self._text_to_image(
            prompt, negative_prompt, steps=num_inference_steps, guidance_scale=guidance_scale,
            guided=guidance_scale != 1.0, height=height, width=width, per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, eta=eta, output_type=output_type, progress=progress,
            callback=callback, max_length=max_length, scale_first=True,
        )
