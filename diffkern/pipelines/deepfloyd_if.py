"""DeepFloyd IF (the public Imagen) stage by stage, on diffkern schedulers and ops.

    stage_1 = IFPipeline(tokenizer, text_encoder, unet_I, scheduler_I)
    stage_2 = IFSuperResolutionPipeline(None, None, unet_II, scheduler_II, image_noising_scheduler)
    pe, ne = stage_1.encode_prompt("a photo of a red cat")
    low = stage_1(prompt_embeds=pe, negative_prompt_embeds=ne, output_type="pt").images   # (1, 3, 64, 64)
    image = stage_2(image=low, prompt_embeds=pe, negative_prompt_embeds=ne).images[0]    # 256 x 256 PIL

Arguments, defaults and draw order are diffusers' IFPipeline / IFSuperResolutionPipeline /
IFImg2ImgPipeline / IFInpaintingPipeline (same components and generator -> the same images).
Differences: guidance, dynamic thresholding and the DDPM update are one fused guided_step;
`timesteps` also takes the name of one of IF's schedules ("smart50", "super27", ...); the safety
checker and watermarker are optional (skipped, with a warning, when None).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from diffkern.pipelines import _if_images as I
from diffkern.pipelines._if_common import IFPipelineBase, IFPipelineOutput, as_diffkern_scheduler
from diffkern.pipelines.stable_diffusion import check_strength

logger = logging.getLogger(__name__)
# stage II's noise-conditioning augmentation: diffusers noises the upscaled image once ("once"); DeepFloyd IF's
# own SuperResUNetModel re-noises it at every model call, per guidance half ("per_call")
LOW_RES_NOISE = ("once", "per_call")

__all__ = ["IFPipeline", "IFSuperResolutionPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline",
           "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline",
           "IFPipelineOutput"]


class IFPipeline(IFPipelineBase):
    """Stage I: text -> 64 x 64 pixels (IF-I-M / L / XL)."""

    @torch.no_grad()
    def __call__(self, prompt=None, num_inference_steps=100, timesteps=None, guidance_scale=7.0,
                 negative_prompt=None, num_images_per_prompt=1, height=None, width=None, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, clean_caption=True,
                 cross_attention_kwargs=None, progress=None):
        """Generate images for `prompt` (or `prompt_embeds`): diffusers' IFPipeline.__call__.

        Args:
            timesteps: descending custom timesteps or a schedule name ("smart100", "fast27", ...);
                overrides num_inference_steps.
            guidance_scale: w of uncond + w (cond - uncond) on the eps channels; guidance runs when w > 1.
            height, width: pixels (default unet.config.sample_size).
            eta: accepted for diffusers' signature; DDPM has no eta.
            generator: torch.Generator or one per image; x_T and each step's noise are drawn from it as
                diffusers draws them.
            output_type: "pil", "np" ([0, 1]) or "pt" (the raw sample in [-1, 1], for stage II).
            callback(i, t, images) every callback_steps steps. clean_caption: DeepFloyd's caption
                cleaning (needs beautifulsoup4 and ftfy; otherwise lower/strip, with a warning).
        Returns:
            IFPipelineOutput (images, nsfw_detected, watermark_detected), or its tuple.
        """
        batch = self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                    callback_steps)
        height, width = self._size(height, "height"), self._size(width, "width")
        guided = guidance_scale > 1.0
        context = self._context(prompt, negative_prompt, num_images_per_prompt, guided, prompt_embeds,
                                negative_prompt_embeds, clean_caption)
        steps = self._set_timesteps(num_inference_steps, timesteps)
        n = batch * num_images_per_prompt
        _check_generator(generator, n)
        x = self._noise((n, self.unet.config.in_channels, height, width), generator)
        x = x * self.scheduler.init_noise_sigma
        x = self._denoise(x, steps, context, guidance_scale, generator,
                          cross_attention_kwargs=cross_attention_kwargs, callback=callback,
                          callback_steps=callback_steps, progress=progress)
        return self._finish(x, output_type, return_dict)


class IFSuperResolutionPipeline(IFPipelineBase):
    """Stage II: 64 -> 256 (IF-II-M / L), conditioned on the bilinearly upsampled low-resolution image
    noised to `noise_level` by image_noising_scheduler (noise-conditioning augmentation; the level
    goes to the UNet as class_labels)."""

    _extra_schedulers = ("image_noising_scheduler",)

    def __init__(self, tokenizer, text_encoder, unet, scheduler, image_noising_scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, requires_safety_checker=True):
        super().__init__(tokenizer, text_encoder, unet, scheduler, safety_checker, feature_extractor,
                         watermarker, requires_safety_checker)
        self.image_noising_scheduler = as_diffkern_scheduler(image_noising_scheduler,
                                                             "image_noising_scheduler")
        if unet.config.in_channels != 6:
            logger.warning("IFSuperResolutionPipeline: the UNet takes %d input channels, not 6 (image + "
                           "upscaled low-res image): is it a super-resolution checkpoint?",
                           unet.config.in_channels)

    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, image=None, num_inference_steps=50,
                 timesteps=None, guidance_scale=4.0, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, cross_attention_kwargs=None,
                 noise_level=250, clean_caption=True, progress=None, low_res_noise="once"):
        """Upscale `image` following `prompt` (or `prompt_embeds`): diffusers'
        IFSuperResolutionPipeline.__call__.

        Args:
            image: the low-resolution image(s), one per prompt: stage I's output_type="pt" tensor
                (B, 3, h, w) in [-1, 1], PIL images, or (B, h, w, 3) arrays in [-1, 1].
            height, width: output pixels (default unet.config.sample_size).
            noise_level: the augmentation timestep in [0, image_noising_scheduler's num_train_timesteps).
            low_res_noise: "once" (diffusers: the upscaled image is noised once, the same noise for every
                step and both guidance halves) or "per_call" (DeepFloyd IF's own SuperResUNetModel: fresh
                noise at every UNet call, drawn separately for the conditional and unconditional halves).
            The others as IFPipeline (defaults: 50 steps, guidance 4.0; timesteps e.g. "super27").
        """
        if low_res_noise not in LOW_RES_NOISE:
            raise ValueError(f"low_res_noise: expected one of {LOW_RES_NOISE}, got {low_res_noise!r}")
        batch = self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                    callback_steps)
        self._check_low_res(image, batch, noise_level)
        height, width = self._size(height, "height"), self._size(width, "width")
        guided = guidance_scale > 1.0
        context = self._context(prompt, negative_prompt, num_images_per_prompt, guided, prompt_embeds,
                                negative_prompt_embeds, clean_caption)
        steps = self._set_timesteps(num_inference_steps, timesteps)
        n = batch * num_images_per_prompt
        _check_generator(generator, n)
        channels = self.unet.config.in_channels // 2
        x = self._noise((n, channels, height, width), generator) * self.scheduler.init_noise_sigma
        upscaled, class_labels = self._noised_upscale(image, (height, width), num_images_per_prompt,
                                                      noise_level, generator, guided,
                                                      per_call=low_res_noise == "per_call")
        x = self._denoise(x, steps, context, guidance_scale, generator, extra=upscaled,
                          class_labels=class_labels, cross_attention_kwargs=cross_attention_kwargs,
                          callback=callback, callback_steps=callback_steps, progress=progress)
        return self._finish(x, output_type, return_dict)

    def _check_low_res(self, image, batch, noise_level):
        if image is None:
            raise ValueError("image: required (the low-resolution image to upscale, e.g. stage I's "
                             "output_type='pt' output)")
        levels = self.image_noising_scheduler.config.num_train_timesteps
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < levels:
            raise ValueError(f"noise_level: expected an int in [0, {levels}) (a timestep of "
                             f"image_noising_scheduler), got {noise_level!r}")
        if I.image_batch(image) != batch:
            raise ValueError(f"image: got {I.image_batch(image)} images for {batch} prompts (one per prompt)")

    def _noised_upscale(self, image, size, per_prompt, noise_level, generator, guided, per_call=False):
        """Noise-conditioning augmentation: (the low-res image upsampled bilinearly (align_corners) to
        `size` and noised to noise_level, the level per UNet row as class_labels). per_call: instead of
        the noised image, a function drawing it afresh for every UNet call, per guidance half ([uncond;
        cond] rows, uncond's noise drawn first), as IF's SuperResUNetModel.forward re-noises its input."""
        channels = self.unet.config.in_channels // 2
        low = I.stage2_image(image)
        if low.dim() != 4 or low.shape[1] != channels:
            raise ValueError(f"image: expected (B, {channels}, h, w) images, got shape {tuple(low.shape)}")
        low = low.to(device=self.device, dtype=self.dtype).repeat_interleave(per_prompt, dim=0)
        upscaled = F.interpolate(low, tuple(size), mode="bilinear", align_corners=True)
        levels = torch.full((upscaled.shape[0],), noise_level, device=self.device, dtype=torch.int64)
        labels = torch.cat([levels, levels]) if guided else levels
        if per_call:
            clean = upscaled

            def fresh():
                return torch.cat([self.image_noising_scheduler.add_noise(clean, self._noise(clean.shape, generator),
                                                                         levels) for _ in range(2 if guided else 1)])

            return fresh, labels
        noise = self._noise(upscaled.shape, generator)
        upscaled = self.image_noising_scheduler.add_noise(upscaled, noise, levels)
        return upscaled, labels


class IFImg2ImgPipeline(IFPipelineBase):
    """Stage I image-to-image: the image (resized to the sample size) noised to `strength` of the
    schedule, then denoised following the prompt."""

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength=0.7, num_inference_steps=80, timesteps=None,
                 guidance_scale=10.0, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, clean_caption=True,
                 cross_attention_kwargs=None, progress=None):
        """diffusers' IFImg2ImgPipeline.__call__ (defaults: strength 0.7, 80 steps, guidance 10).

        image: one per prompt; PIL (resized as DeepFloyd does), (B, H, W, 3) arrays or (B, 3, H, W)
        tensors in [-1, 1]. The other arguments as IFPipeline."""
        call = {k: v for k, v in locals().items() if k not in ("self", "eta")}
        return self._edit(mask_image=None, **call)

    def _edit(self, prompt, image, mask_image, strength, num_inference_steps, timesteps, guidance_scale,
              negative_prompt, num_images_per_prompt, generator, prompt_embeds, negative_prompt_embeds,
              output_type, return_dict, callback, callback_steps, clean_caption, cross_attention_kwargs,
              progress, low_res=None, noise_level=None):
        """Image-to-image / inpainting of `image` (the original); with `low_res` the super-resolution
        variants: the UNet is also fed the low-res image upscaled to the original's size and noised to
        noise_level by image_noising_scheduler (drawn after the original's noise, as diffusers)."""
        per_prompt = num_images_per_prompt
        batch = self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                    callback_steps)
        if image is None:
            raise ValueError("image: required (the image to transform)")
        if I.image_batch(image) != batch:
            raise ValueError(f"image: got {I.image_batch(image)} images for {batch} prompts (one per prompt)")
        if mask_image is not None and I.image_batch(mask_image, "mask_image") not in (1, batch):
            raise ValueError(f"mask_image: got {I.image_batch(mask_image, 'mask_image')} masks for {batch} "
                             "prompts (one, or one per prompt)")
        check_strength(strength)
        guided = guidance_scale > 1.0
        context = self._context(prompt, negative_prompt, per_prompt, guided, prompt_embeds,
                                negative_prompt_embeds, clean_caption)
        all_steps = self._set_timesteps(num_inference_steps, timesteps)
        count = len(all_steps)
        start = max(count - min(int(count * strength), count), 0)
        steps = all_steps[start:]
        if len(steps) == 0:
            raise ValueError(f"strength: {strength} x {count} steps leaves no denoising step; raise either")
        size = self.unet.config.sample_size
        pixels = I.stage1_image(image, size).to(device=self.device, dtype=self.dtype)
        channels = self.unet.config.in_channels // (1 if low_res is None else 2)
        if pixels.dim() != 4 or pixels.shape[1] != channels:
            name = "image" if low_res is None else "original_image"
            raise ValueError(f"{name}: expected (B, {channels}, H, W) images, "
                             f"got shape {tuple(pixels.shape)}")
        n = batch * per_prompt
        mask = None
        if mask_image is not None:
            mask = I.stage1_mask(mask_image, size).to(device=self.device, dtype=self.dtype)
            mask = mask.repeat_interleave(n if mask.shape[0] == 1 else per_prompt, dim=0)
        _check_generator(generator, n)
        noise = self._noise((n,) + tuple(pixels.shape[1:]), generator)
        pixels = pixels.repeat_interleave(per_prompt, dim=0)
        x = self.scheduler.add_noise(pixels, noise, steps[:1].repeat(n))
        if mask is not None:
            x = (1 - mask) * pixels + mask * x
        extra = class_labels = None
        if low_res is not None:
            extra, class_labels = self._noised_upscale(low_res, pixels.shape[2:], per_prompt, noise_level,
                                                       generator, guided)
        x = self._denoise(x, steps, context, guidance_scale, generator, mask=mask, extra=extra,
                          class_labels=class_labels, cross_attention_kwargs=cross_attention_kwargs,
                          callback=callback, callback_steps=callback_steps, progress=progress)
        return self._finish(x, output_type, return_dict)


class IFInpaintingPipeline(IFImg2ImgPipeline):
    """Stage I inpainting: where mask_image is 1 the image is regenerated, elsewhere kept (blended
    back after every step)."""

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, mask_image=None, strength=1.0, num_inference_steps=50,
                 timesteps=None, guidance_scale=7.0, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, clean_caption=True,
                 cross_attention_kwargs=None, progress=None):
        """diffusers' IFInpaintingPipeline.__call__ (defaults: strength 1.0, 50 steps, guidance 7).

        mask_image: 1 (white, >= 0.5) = repaint; PIL (resized as the image), (H, W) arrays or tensors
        (B, 1, H, W) / (1, H, W) / (B, H, W). One mask for every image or one per prompt."""
        if mask_image is None:
            raise ValueError("mask_image: required (1 where the image is repainted)")
        return self._edit(**{k: v for k, v in locals().items() if k not in ("self", "eta")})


def _check_generator(generator, n):
    if isinstance(generator, list) and len(generator) != n:
        raise ValueError(f"generator: got a list of {len(generator)} generators for {n} images "
                         "(prompts x num_images_per_prompt)")


class IFImg2ImgSuperResolutionPipeline(IFSuperResolutionPipeline, IFImg2ImgPipeline):
    """Stage II image-to-image: `original_image` (at the output size) noised to `strength` and
    denoised, conditioned on the noised upscale of the low-res `image` (diffusers' pipeline of the name)."""

    @torch.no_grad()
    def __call__(self, image=None, original_image=None, strength=0.8, prompt=None, num_inference_steps=50,
                 timesteps=None, guidance_scale=4.0, negative_prompt=None, num_images_per_prompt=1, eta=0.0,
                 generator=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil",
                 return_dict=True, callback=None, callback_steps=1, cross_attention_kwargs=None,
                 noise_level=250, clean_caption=True, progress=None):
        """image: the low-res image (one per prompt); original_image: the image to transform, read as
        IFImg2ImgPipeline reads its image (PIL resized to the UNet's sample size). The others as
        IFSuperResolutionPipeline / IFImg2ImgPipeline (defaults: strength 0.8, 50 steps, guidance 4)."""
        return self._sr_edit(locals(), None)

    def _sr_edit(self, call, mask_image):
        call = {k: v for k, v in call.items() if k not in ("self", "eta", "__class__")}
        low_res, original = call.pop("image"), call.pop("original_image")
        call.pop("mask_image", None)
        batch = self._check_prompts(call["prompt"], call["negative_prompt"], call["prompt_embeds"],
                                    call["negative_prompt_embeds"], call["callback_steps"])
        self._check_low_res(low_res, batch, call["noise_level"])
        if original is None:
            raise ValueError("original_image: required (the image to transform at the output size)")
        return self._edit(image=original, mask_image=mask_image, low_res=low_res, **call)


class IFInpaintingSuperResolutionPipeline(IFImg2ImgSuperResolutionPipeline):
    """Stage II inpainting: repaint `original_image` where mask_image is 1, conditioned on the noised
    upscale of the low-res `image` (diffusers' pipeline of the name)."""

    @torch.no_grad()
    def __call__(self, image=None, original_image=None, mask_image=None, strength=0.8, prompt=None,
                 num_inference_steps=100, timesteps=None, guidance_scale=4.0, negative_prompt=None,
                 num_images_per_prompt=1, eta=0.0, generator=None, prompt_embeds=None,
                 negative_prompt_embeds=None, output_type="pil", return_dict=True, callback=None,
                 callback_steps=1, cross_attention_kwargs=None, noise_level=0, clean_caption=True,
                 progress=None):
        """As IFImg2ImgSuperResolutionPipeline plus mask_image (as IFInpaintingPipeline's); defaults:
        strength 0.8, 100 steps, guidance 4, noise_level 0."""
        if mask_image is None:
            raise ValueError("mask_image: required (1 where the image is repainted)")
        return self._sr_edit(locals(), mask_image)
