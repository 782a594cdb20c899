"""unCLIP image variations (DALL-E 2 sec. 3.1; Karlo v1-alpha image-variations), diffusers'
UnCLIPImageVariationPipeline contract: image -> CLIP image embedding -> decoder -> super-resolution.

As in diffusers and Karlo, the decoder starts from white noise (`decoder_latents` or the generator);
the paper's variations from the DDIM-inverted x_T are diffkern.pipelines.UnCLIPManipulations.
"""

from __future__ import annotations

import torch

from diffkern.pipelines._common import ImagePipelineOutput
from diffkern.pipelines import _unclip_stages as stages
from diffkern.pipelines.unclip import UnCLIPPipeline, _folder_components

PIL_MODES = ("RGB", "RGBA", "L")  # what CLIP's preprocessing converts to RGB without guessing


class UnCLIPImageVariationPipeline:
    """Variations of an image from its CLIP image embedding (the empty prompt as text).

    Components (diffusers' names): decoder, text_encoder (CLIPTextModelWithProjection), tokenizer,
    text_proj, feature_extractor (transformers CLIPImageProcessor), image_encoder
    (CLIPVisionModelWithProjection), super_res_first, super_res_last, decoder_scheduler,
    super_res_scheduler. `from_diffusers(pipe)` converts every model to diffkern's.
    """

    def __init__(self, decoder, text_encoder, tokenizer, text_proj, feature_extractor, image_encoder,
                 super_res_first, super_res_last, decoder_scheduler, super_res_scheduler):
        self.decoder, self.text_encoder, self.tokenizer, self.text_proj = decoder, text_encoder, tokenizer, text_proj
        self.feature_extractor, self.image_encoder = feature_extractor, image_encoder
        self.super_res_first, self.super_res_last = super_res_first, super_res_last
        self.decoder_scheduler = stages.unclip_scheduler(decoder_scheduler, "decoder_scheduler")
        self.super_res_scheduler = stages.unclip_scheduler(super_res_scheduler, "super_res_scheduler")

    @classmethod
    def from_diffusers(cls, pipe):
        """The same pipeline on diffkern models (CLIP towers, tokenizer and feature extractor shared)."""
        from diffkern.models import from_diffusers

        return cls(decoder=from_diffusers(pipe.decoder), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   text_proj=from_diffusers(pipe.text_proj), feature_extractor=pipe.feature_extractor,
                   image_encoder=pipe.image_encoder, super_res_first=from_diffusers(pipe.super_res_first),
                   super_res_last=from_diffusers(pipe.super_res_last), decoder_scheduler=pipe.decoder_scheduler,
                   super_res_scheduler=pipe.super_res_scheduler)

    @classmethod
    def from_pretrained(cls, folder, *, dtype=None, device="cpu", variant=None):
        """Load a Karlo image-variations diffusers folder into diffkern's models."""
        return cls(**_folder_components(folder, cls.__name__, dtype, device, variant))

    @property
    def device(self):
        return stages.module_device(self.decoder)

    decode = UnCLIPPipeline.decode

    def image_batch(self, image):
        """How many images `image` holds, checking its type and modes."""
        from PIL import Image

        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list):
            if not image or not all(isinstance(i, Image.Image) for i in image):
                raise ValueError("image: expected a PIL image, a non-empty list of PIL images or a tensor")
            bad = sorted({i.mode for i in image if i.mode not in PIL_MODES})
            if bad:
                raise ValueError(f"image: PIL mode(s) {bad} not supported (expected one of {PIL_MODES})")
            return len(image)
        if isinstance(image, torch.Tensor):
            size = getattr(getattr(self.image_encoder, "config", None), "image_size", None)
            if image.dim() != 4 or image.shape[1] != 3 or (size and tuple(image.shape[2:]) != (size, size)):
                raise ValueError(f"image: a tensor must be CLIP pixel values (B, 3, {size}, {size}), "
                                 f"got {tuple(image.shape)}")
            return image.shape[0]
        raise ValueError(f"image: expected a PIL image, a list of them or a tensor, got {type(image).__name__}")

    def encode_image(self, image, num_images_per_prompt=1, image_embeddings=None):
        """CLIP image embeddings (B x n, D): from `image_embeddings` or the image encoder's image_embeds
        (PIL images through the feature extractor, tensors taken as its pixel values)."""
        if image_embeddings is None:
            self.image_batch(image)
            if not isinstance(image, torch.Tensor):
                image = self.feature_extractor(images=image, return_tensors="pt").pixel_values
            dtype = next(self.image_encoder.parameters()).dtype
            image_embeddings = self.image_encoder(image.to(device=self.device, dtype=dtype)).image_embeds
        return image_embeddings.repeat_interleave(num_images_per_prompt, dim=0)

    @torch.no_grad()
    def __call__(self, image=None, num_images_per_prompt=1, decoder_num_inference_steps=25,
                 super_res_num_inference_steps=7, generator=None, decoder_latents=None, super_res_latents=None,
                 image_embeddings=None, decoder_guidance_scale=8.0, output_type="pil", return_dict=True):
        """Generate variations; arguments as diffusers' UnCLIPImageVariationPipeline.__call__.

        image: PIL image(s) or CLIP pixel values (B, 3, S, S); may be None when image_embeddings
        (B, D) are given (interpolations). decoder_latents / super_res_latents are used as given.
        """
        if image is not None:
            batch = self.image_batch(image)
        elif image_embeddings is not None:
            batch = image_embeddings.shape[0]
        else:
            raise ValueError("image: give an image (or images) or image_embeddings")
        dim = self.text_proj.config.clip_embeddings_dim
        if image_embeddings is not None and (not isinstance(image_embeddings, torch.Tensor)
                                             or image_embeddings.dim() != 2 or image_embeddings.shape[1] != dim):
            got = tuple(image_embeddings.shape) if isinstance(image_embeddings, torch.Tensor) else image_embeddings
            raise ValueError(f"image_embeddings: expected (B, {dim}), got {got}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected an int >= 1, got {num_images_per_prompt!r}")
        guided = decoder_guidance_scale > 1.0
        embeds, hidden, mask = stages.encode_prompt(self.text_encoder, self.tokenizer, [""] * batch, self.device,
                                                    num_images_per_prompt, guided, warn_truncation=False)
        image_embeddings = self.encode_image(image, num_images_per_prompt, image_embeddings)
        image_small = self.decode(image_embeddings, embeds, hidden, mask, guided=guided,
                                  steps=decoder_num_inference_steps, guidance_scale=decoder_guidance_scale,
                                  generator=generator, latents=decoder_latents, scale_latents=False)
        image = stages.run_super_res(self.super_res_first, self.super_res_last, self.super_res_scheduler,
                                     image_small, steps=super_res_num_inference_steps, generator=generator,
                                     latents=super_res_latents, scale_latents=False)
        images = stages.to_output(image, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
