"""Stable Diffusion inpainting (the 9-channel inpainting checkpoints) on diffkern models and schedulers.

    pipe = StableDiffusionInpaintPipeline.from_pretrained("sd-inpainting", dtype=torch.float16, device="cuda")
    image = pipe("a red cat on a bench", image=photo, mask_image=mask,
                 generator=torch.Generator().manual_seed(0)).images[0]

The inpainting UNet sees, at every step, 4 + 1 + 4 channels: the noisy latents, the mask downsampled to
the latent grid, and the VAE latents of the image with the masked region zeroed. The call follows
diffusers' StableDiffusionInpaintPipeline step for step, so equal weights and seed give equal images:

- image: as the image-to-image pipeline reads it ([-1, 1]), resized to height x width (default: the
  UNet's sample_size x 8, not the image's size, as diffusers);
- mask_image: grayscale, resized to height x width the same way, then binarised at 0.5 (white, 1,
  is repainted); the masked image is image * (mask < 0.5);
- random draws from the generator, in diffusers' order: with strength < 1 a posterior sample of the
  image's latents, then the noise x_T (the pure noise at strength 1, else the image latents noised to
  the first timestep), then a posterior sample of the masked image's latents (diffusers samples here
  too, it does not take the mode), then each step's noise.

Differences: no safety checker, no padding_mask_crop / masked_image_latents / 4-channel (non-inpainting)
UNets; the guidance combine runs inside the scheduler's fused step; the scheduler is a diffkern one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffkern.pipelines import _common as C
from diffkern.pipelines.stable_diffusion import _StableDiffusionBase, check_strength, strength_timesteps
from diffkern.schedulers.sampling import denoise_loop


class StableDiffusionInpaintPipeline(_StableDiffusionBase):
    """Repaint the white part of a mask following a prompt, with an SD inpainting UNet (in_channels 9).

    Components as StableDiffusionPipeline's; the UNet must take 2 * latent_channels + 1 input channels.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        latent = vae.config.latent_channels
        got = unet.config.in_channels
        if got != 2 * latent + 1:
            raise ValueError(
                f"unet: an inpainting UNet takes {2 * latent + 1} input channels (latents {latent} + mask 1 "
                f"+ masked-image latents {latent}), this one takes {got}: load an inpainting checkpoint "
                "(e.g. stable-diffusion-inpainting); a text-to-image checkpoint cannot inpaint with this "
                "pipeline")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler)

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, negative_prompt=None, *, strength=1.0,
                 num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, generator=None,
                 latents=None, eta=0.0, output_type="pil", height=None, width=None, prompt_embeds=None,
                 negative_prompt_embeds=None, progress=None, callback=None, clip_skip=None):
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
            ImagePipelineOutput with `.images`.
        """
        if image is None or mask_image is None:
            raise ValueError("image, mask_image: both are required (the picture and where to repaint it)")
        check_strength(strength)
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        batch = count * num_images_per_prompt
        self._common_checks(output_type, generator, num_images_per_prompt, batch, num_inference_steps)
        height, width = self._size(height, width)
        guided = guidance_scale > 1
        context = self._context(prompts, negative_prompt, num_images_per_prompt, guided, clip_skip,
                                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        f = self.vae_scale_factor
        pixels = C.preprocess_image(image, height, width, f)
        mask = preprocess_mask(mask_image, height, width)
        n_images, n_masks = pixels.shape[0], mask.shape[0]
        if n_masks != n_images and 1 not in (n_images, n_masks):
            raise ValueError(f"mask_image: {n_masks} masks for {n_images} images; give one mask or one per "
                             "image")
        masked = pixels * (mask < 0.5)  # the repainted region becomes 0 (mid-gray), as diffusers feeds it
        for name, n in (("image", n_images), ("mask_image", masked.shape[0])):
            if batch % n:
                raise ValueError(f"{name}: {n} cannot be spread over {batch} outputs (prompts x "
                                 "num_images_per_prompt); give one or one per output")

        sched = self.scheduler
        timesteps = strength_timesteps(sched, num_inference_steps, strength, self.device)
        shape = (batch, self.vae.config.latent_channels, height // f, width // f)
        x = self._initial_latents(shape, pixels, latents, strength, timesteps[:1], generator)
        masked_latents = _tile(self._encode(masked, generator), batch)
        small_mask = _tile(F.interpolate(mask, size=shape[2:]), batch)  # nearest, as diffusers
        extra = torch.cat([small_mask.to(device=self.device, dtype=self.dtype), masked_latents], dim=1)
        extra = torch.cat([extra, extra]) if guided else extra  # UNet input: latents, mask, masked latents
        x = denoise_loop(
            C.guided_model_fn(self.unet, context, guided, extra=extra),
            sched, x, timesteps, guidance_scale=guidance_scale if guided else None, generator=generator,
            progress=self.progress if progress is None else progress, step_kwargs=C.step_kwargs(sched, eta),
            callback=callback,
        )
        return self._finish(x, output_type)

    def _initial_latents(self, shape, pixels, latents, strength, first_t, generator):
        """x at the first timestep: given latents, pure noise (strength 1) or the noised image latents."""
        sigma = self.scheduler.init_noise_sigma
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=self.device, dtype=self.dtype) * sigma
        # the image is encoded (a posterior draw) only when it is needed, before the noise: diffusers' order
        init = None if strength == 1 else _tile(self._encode(pixels, generator), shape[0])
        noise = C.initial_noise(shape, generator, self.device, self.dtype)
        if init is None:
            return noise * sigma
        return self.scheduler.add_noise(init, noise, first_t.repeat(shape[0]))

    def _encode(self, pixels, generator):
        """Scaled posterior samples of `pixels`, one per image; a list of generators gives image i
        generator i (diffusers encodes before repeating, unlike its image-to-image pipeline)."""
        vae_dtype = next(self.vae.parameters()).dtype
        pixels = pixels.to(device=self.device, dtype=vae_dtype)
        if isinstance(generator, (list, tuple)):
            generator = list(generator[: pixels.shape[0]])
        z = C.vae_encode(self.vae, pixels).sample(generator)
        return (self.vae.config.scaling_factor * z).to(self.dtype)


def _tile(x, batch):
    """[x; x; ...] up to `batch` rows (torch's repeat: the whole batch again, not each row in a row)."""
    return x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


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
