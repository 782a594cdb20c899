"""Stable Diffusion x4 upscaler (IF's stage III): a latent UNet conditioned on the noised low-res image.

    pipe = StableDiffusionUpscalePipeline(vae, text_encoder, tokenizer, unet, low_res_scheduler, scheduler)
    image = pipe("a red cat", image=low_res_256, noise_level=100).images[0]           # 1024 x 1024

diffusers' StableDiffusionUpscalePipeline argument for argument (75 steps, guidance 9, noise_level
20 of at most max_noise_level=350): the low-res image is noised by `low_res_scheduler` to noise_level
(which the UNet takes as its class label, `num_class_embeds`), concatenated to the 4 latent channels
(7 UNet input channels), denoised (v-prediction) and decoded with the VAE scaled by 0.08333.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from diffkern.pipelines import _common as C
from diffkern.pipelines._if_common import as_diffkern_scheduler, unet_call
from diffkern.pipelines.stable_diffusion import LatentDiffusionPipelineBase

logger = logging.getLogger(__name__)

X4_SCALING_FACTOR = 0.08333


@dataclass
class StableDiffusionPipelineOutput:
    """diffusers' StableDiffusionPipelineOutput: `images`, `nsfw_content_detected` (None without a
    safety checker)."""

    images: object
    nsfw_content_detected: list | None = None

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]


class StableDiffusionUpscalePipeline(LatentDiffusionPipelineBase):
    """Text-guided x4 super-resolution (stabilityai/stable-diffusion-x4-upscaler; DeepFloyd IF's stage III).

    Components as diffusers': vae, text_encoder (CLIP), tokenizer, unet (7 input channels, class
    embeddings for the noise level), low_res_scheduler (DDPM, only add_noise is used), scheduler
    (DDIM / DDPM; a diffusers one is converted from its config), optional safety_checker /
    feature_extractor / watermarker (skipped, and noted, when None), max_noise_level.
    """

    def __init__(self, vae, text_encoder, tokenizer, unet, low_res_scheduler, scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, max_noise_level=350):
        super().__init__(unet, vae, text_encoder, tokenizer, as_diffkern_scheduler(scheduler))
        self.low_res_scheduler = as_diffkern_scheduler(low_res_scheduler, "low_res_scheduler")
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self.watermarker = watermarker
        self.max_noise_level = max_noise_level
        self.scaling_factor = getattr(vae.config, "scaling_factor", None)
        if self.scaling_factor != X4_SCALING_FACTOR:
            # diffusers rewrites the VAE config to 0.08333 here; we leave the caller's VAE alone
            logger.warning("vae: scaling_factor %s is not the x4 upscaler's; using %s, as diffusers does",
                           self.scaling_factor, X4_SCALING_FACTOR)
            self.scaling_factor = X4_SCALING_FACTOR
        if safety_checker is None:
            self.notes.append("safety checker: absent, images are not checked")

    @classmethod
    def from_loaded(cls, loaded, scheduler="ddim"):
        """Build from diffkern.models.loading.load of a stable-diffusion-x4-upscaler folder (its
        low_res_scheduler and max_noise_level included); scheduler: "ddim" / "ddpm" or an instance."""
        from diffkern import schedulers
        from diffkern.pipelines.stable_diffusion import components

        parts = components(loaded)
        low = (getattr(loaded, "components", None) or {}).get("low_res_scheduler")
        if low is None:
            raise ValueError("loaded: no low_res_scheduler (is it a stable-diffusion-x4-upscaler folder?)")
        index = getattr(loaded, "model_index", None) or {}
        pipe = cls(parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["unet"],
                   schedulers.DDPMScheduler.from_config(low),
                   C.make_scheduler(scheduler, parts["scheduler_config"]),
                   max_noise_level=index.get("max_noise_level", 350))
        pipe.notes += list(getattr(loaded, "notes", None) or [])
        return pipe

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, num_inference_steps=75, guidance_scale=9.0, noise_level=20,
                 negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                 callback=None, callback_steps=1, cross_attention_kwargs=None, clip_skip=None, progress=None):
        """Upscale `image` following `prompt` (or `prompt_embeds`).

        Args:
            image: PIL image(s), a float array (B, H, W, 3) or a tensor (B, 3, H, W) in [0, 1] (or
                [-1, 1], e.g. IF stage II's output_type="pt"); one per prompt. Sides are rounded down
                to multiples of the VAE's downscale.
            noise_level: int in [0, max_noise_level], the augmentation timestep of low_res_scheduler.
            latents: (B, 4, H, W) starting latents instead of drawing them.
            output_type: "pil", "np", "pt" ([0, 1]) or "latent". The rest as StableDiffusionPipeline.
        Returns:
            StableDiffusionPipelineOutput (images, nsfw_content_detected), or its tuple.
        """
        if not isinstance(callback_steps, int) or callback_steps <= 0:
            raise ValueError(f"callback_steps: expected a positive int, got {callback_steps!r}")
        prompts, count = self._prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        if image is None:
            raise ValueError("image: required (the low-resolution image to upscale)")
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or \
                not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level: expected an int in [0, {self.max_noise_level}] "
                             f"(max_noise_level), got {noise_level!r}")
        n_images = len(image) if isinstance(image, list) else (
            image.shape[0] if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4 else 1)
        if n_images != count:
            raise ValueError(f"image: got {n_images} images for {count} prompts (one per prompt)")
        batch = count * num_images_per_prompt
        self._common_checks("pt" if output_type == "latent" else output_type, generator,
                            num_images_per_prompt, batch, num_inference_steps)
        guided = guidance_scale > 1.0
        context = self._context(prompts, negative_prompt, num_images_per_prompt, guided, clip_skip,
                                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        low = self._preprocess(image).to(device=self.device, dtype=self.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        level = torch.tensor([noise_level], dtype=torch.long, device=self.device)
        noise = C.initial_noise(low.shape, generator, self.device, self.dtype)
        low = self.low_res_scheduler.add_noise(low, noise, level)
        # diffusers tiles (not interleaves) the image over the guidance halves and the images per prompt
        low = torch.cat([low] * (2 if guided else 1) * num_images_per_prompt)
        levels = level.repeat(low.shape[0])
        latent_channels = self.vae.config.latent_channels
        if latent_channels + low.shape[1] != self.unet.config.in_channels:
            raise ValueError(f"image: {low.shape[1]} channels + {latent_channels} latent channels do not "
                             f"make the UNet's {self.unet.config.in_channels} input channels")
        shape = (batch, latent_channels) + tuple(low.shape[2:])
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(self.device) if latents is not None else C.initial_noise(shape, generator, self.device,
                                                                                 self.dtype)
        x = x * self.scheduler.init_noise_sigma
        x = self._loop(x, context, low, levels, guidance_scale if guided else None, generator, eta,
                       cross_attention_kwargs, callback, callback_steps, progress)
        if output_type == "latent":
            out = StableDiffusionPipelineOutput(x)
        else:
            vae_dtype = next(self.vae.parameters()).dtype
            decoded = C.vae_decode(self.vae, (x / self.scaling_factor).to(vae_dtype))
            nsfw = None
            if self.safety_checker is not None:
                decoded, nsfw = self._safety(decoded)
            images = C.postprocess(decoded, output_type)
            if output_type == "pil" and self.watermarker is not None:
                images = self.watermarker.apply_watermark(images)
            out = StableDiffusionPipelineOutput(images, nsfw)
        return out if return_dict else (out.images, out.nsfw_content_detected)

    def _loop(self, x, context, low, levels, guidance_scale, generator, eta, cross_attention_kwargs, callback,
              callback_steps, progress):
        from diffkern.schedulers.sampling import _progress

        sched = self.scheduler
        kw = C.step_kwargs(sched, eta)
        steps = sched.timesteps
        for i, t in enumerate(_progress(steps, self.progress if progress is None else progress, len(steps))):
            x_in = sched.scale_model_input(torch.cat([x, x]) if guidance_scale is not None else x, t)
            x_in = torch.cat([x_in, low], dim=1)
            out = unet_call(self.unet, x_in, t, context, levels, cross_attention_kwargs)
            if guidance_scale is None:
                x = sched.step(out, t, x, generator=generator, return_dict=False, **kw)[0]
            else:
                uncond, cond = out.chunk(2)
                x = sched.step(cond, t, x, generator=generator, uncond_output=uncond,
                               guidance_scale=guidance_scale, return_dict=False, **kw)[0]
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x)
        return x

    def _preprocess(self, image):
        """diffusers' VaeImageProcessor.preprocess (bicubic for PIL; sides rounded down to multiples of
        the VAE downscale; [0, 1] inputs mapped to [-1, 1], inputs with negatives taken as they are)."""
        from PIL import Image

        f = self.vae_scale_factor
        images = image if isinstance(image, list) else [image]
        if all(isinstance(i, Image.Image) for i in images):
            w, h = images[0].size
            size = (w - w % f, h - h % f)
            arrays = [np.asarray(i.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
                      for i in images]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
        if isinstance(image, list):
            image = (torch.cat if images[0].ndim == 4 else torch.stack)(
                [torch.as_tensor(i) for i in images])
        return C.preprocess_image(image, None, None, f)

    def _safety(self, decoded):
        """The SD safety checker on [0, 1] images; flagged ones come back black."""
        images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        from PIL import Image

        pils = [Image.fromarray(a) for a in (images * 255).round().astype("uint8")]
        clip_input = self.feature_extractor(pils, return_tensors="pt").pixel_values
        clip_input = clip_input.to(self.device, self.dtype)
        checked, nsfw = self.safety_checker(images=decoded, clip_input=clip_input)
        return checked, nsfw
