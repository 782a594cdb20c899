"""Stable Diffusion inpainting (the 9-channel inpainting checkpoints): diffusers' own
StableDiffusionInpaintPipeline on diffkern's UNet, VAE and schedulers, behind diffkern's adapter (see
diffkern.pipelines.stable_diffusion: construction, from_pretrained / from_loaded, prompt encoding,
progress= and callback=).

    pipe = StableDiffusionInpaintPipeline.from_pretrained("sd-inpainting", dtype=torch.float16, device="cuda")
    image = pipe("a red cat on a bench", image=photo, mask_image=mask,
                 generator=torch.Generator().manual_seed(0)).images[0]

The inpainting UNet sees, at every step, 4 + 1 + 4 channels: the noisy latents, the mask downsampled to
the latent grid, and the VAE latents of the image with the masked region zeroed. diffkern reads the
image (as the image-to-image pipeline, resized to height x width: default the UNet's sample_size x 8)
and the mask (`preprocess_mask`: grayscale, resized, binarised at 0.5; white, 1, is repainted), checks
the counts, and hands both to diffusers' __call__, whose draws (posterior samples, x_T, step noise) and
loop are then diffusers' own. diffusers' padding_mask_crop / masked_image_latents pass through as
keywords; 4-channel (non-inpainting) UNets are refused.
"""

from __future__ import annotations

import diffusers
import numpy as np
import torch
import torch.nn.functional as F

from diffkern.pipelines import _common as C
from diffkern.pipelines.stable_diffusion import _DiffusersSDAdapter, check_strength


class StableDiffusionInpaintPipeline(_DiffusersSDAdapter, diffusers.StableDiffusionInpaintPipeline):
    """Repaint the white part of a mask following a prompt, with an SD inpainting UNet (in_channels 9).

    Components as StableDiffusionPipeline's; the UNet must take 2 * latent_channels + 1 input channels.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker=False):
        latent = vae.config.latent_channels
        got = unet.config.in_channels
        if got != 2 * latent + 1:
            raise ValueError(
                f"unet: an inpainting UNet takes {2 * latent + 1} input channels (latents {latent} + mask 1 "
                f"+ masked-image latents {latent}), this one takes {got}: load an inpainting checkpoint "
                "(e.g. stable-diffusion-inpainting); a text-to-image checkpoint cannot inpaint with this "
                "pipeline")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, negative_prompt=None, *, strength=1.0,
                 num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, generator=None,
                 latents=None, eta=0.0, output_type="pil", height=None, width=None, prompt_embeds=None,
                 negative_prompt_embeds=None, progress=None, callback=None, clip_skip=None, **kwargs):
        """Inpaint `image` where `mask_image` is white, following `prompt` (or `prompt_embeds`).

        Args:
            image: PIL image(s), a float array (H, W, 3) / (B, H, W, 3) in [0, 1], or a tensor
                (B, 3, H, W) in [0, 1] (or [-1, 1]); resized to height x width.
            mask_image: PIL image(s) (converted to grayscale), an array (H, W) / (H, W, 1) / (B, H, W) /
                (B, H, W, 1) or a tensor (H, W) / (B, H, W) / (B, 1, H, W) in [0, 1]; resized to
                height x width (Lanczos for PIL, nearest otherwise) and binarised: >= 0.5 is repainted.
                One mask for every image, or one per image.
            strength: in [0, 1]. 1 (default) starts from pure noise; below 1 the image's latents are
                noised to the timestep at this fraction of the schedule and
                int(num_inference_steps * strength) steps run.
            height, width: pixels, multiples of 8; default the UNet's sample_size x 8.
            latents: x_T (B, 4, H/8, W/8) instead of drawing it; as in diffusers it replaces the
                noised image latents even when strength < 1.
            The other arguments are StableDiffusionPipeline's.
        Returns:
            diffusers' StableDiffusionPipelineOutput (`.images`, `.nsfw_content_detected`).
        """
        if image is None or mask_image is None:
            raise ValueError("image, mask_image: both are required (the picture and where to repaint it)")
        check_strength(strength)
        if isinstance(num_inference_steps, int) and int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength: {strength} x num_inference_steps={num_inference_steps} leaves no "
                             "denoising step; raise either")
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        batch = count * num_images_per_prompt
        height, width = self._size(height, width)
        f = self.vae_scale_factor
        pixels = C.preprocess_image(image, height, width, f)
        mask = preprocess_mask(mask_image, height, width)
        n_images, n_masks = pixels.shape[0], mask.shape[0]
        if n_masks != n_images and 1 not in (n_images, n_masks):
            raise ValueError(f"mask_image: {n_masks} masks for {n_images} images; give one mask or one per "
                             "image")
        for name, n in (("image", n_images), ("mask_image", max(n_images, n_masks))):
            if batch % n:
                raise ValueError(f"{name}: {n} cannot be spread over {batch} outputs (prompts x "
                                 "num_images_per_prompt); give one or one per output")
        self._check_latents(latents, (batch, self.vae.config.latent_channels, height // f, width // f))
        # diffkern's reading of image and mask, handed to diffusers as [0, 1] / {0, 1} tensors at the size
        kwargs.update(image=(pixels / 2 + 0.5).clamp(0, 1), mask_image=mask, strength=strength, eta=eta,
                      height=height, width=width, latents=latents)
        return self._run(super().__call__, prompt=prompt, negative_prompt=negative_prompt,
                         prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                         guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                         num_inference_steps=num_inference_steps, generator=generator,
                         output_type=output_type, clip_skip=clip_skip, progress=progress, callback=callback,
                         kwargs=kwargs)


def preprocess_mask(mask_image, height, width):
    """A mask -> (B, 1, height, width) float32 of 0 and 1 (1 = repaint), as diffusers' mask processor
    (VaeImageProcessor with do_normalize=False, do_binarize=True, do_convert_grayscale=True) makes it:
    PIL images are resized (Lanczos) then converted to grayscale; arrays and tensors are resized with
    nearest; values >= 0.5 become 1."""
    from PIL import Image

    masks = mask_image if isinstance(mask_image, list) else [mask_image]
    if masks and all(isinstance(m, Image.Image) for m in masks):
        arrays = [np.asarray(m.resize((width, height), Image.LANCZOS).convert("L"), dtype=np.float32) / 255.0
                  for m in masks]
        mask = torch.from_numpy(np.stack(arrays))[:, None]
    else:
        mask = _mask_tensor(mask_image)
    mask = mask.float()
    if tuple(mask.shape[2:]) != (height, width):
        mask = F.interpolate(mask, size=(height, width))
    return (mask >= 0.5).float()


def _mask_tensor(mask):
    if isinstance(mask, np.ndarray):  # (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1): channels last
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[None]
        elif mask.ndim < 4:
            mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)[..., None]
        mask = torch.from_numpy(np.ascontiguousarray(mask)).permute(0, 3, 1, 2)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask_image: expected a PIL image (or a list), an array or a tensor, "
                        f"got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:  # (B, H, W) or (1, H, W): either way the channel goes second
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask_image: expected one channel, (H, W), (B, H, W) or (B, 1, H, W), "
                         f"got shape {tuple(mask.shape)}")
    return mask
