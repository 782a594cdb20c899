"""The Latent Diffusion inpainting model (CompVis models/ldm/inpainting_big) as a diffusers DiffusionPipeline.

diffusers has no pipeline for it; this one is CompVis's scripts/inpaint.py: the mask is binarised at 0.5,
the masked image (1 - mask) * image is encoded by the VQ autoencoder (unquantized, CompVis's
`__is_first_stage__` conditioning), the mask is resized to the latent size (nearest) and both are
concatenated to the noisy latent as the UNet's input (latent 3 + masked-image latent 3 + mask 1 = 7
channels), images and mask in [-1, 1]. The sample is decoded (quantized) and pasted into the original
outside the mask: (1 - mask) * image + mask * prediction, in [0, 1].

    pipe = LDMInpaintPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(..., steps_offset=1))
    out = pipe(image, mask_image, num_inference_steps=50).images[0]
"""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from diffkern.pipelines.ldm._components import DiffkernComponentsMixin

__all__ = ["LDMInpaintPipeline"]


def _as_tensor(name, value, channels):
    """PIL image(s) or a (B, C, H, W) / (C, H, W) tensor in [0, 1] -> float (B, C, H, W)."""
    if isinstance(value, PIL.Image.Image):
        value = [value]
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], PIL.Image.Image):
        mode = "RGB" if channels == 3 else "L"
        arrays = [np.asarray(v.convert(mode), dtype=np.float32) / 255.0 for v in value]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        value = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: a PIL image, a list of them or a tensor, got {type(value).__name__}")
    if value.dim() == 3:
        value = value[None]
    if value.dim() != 4 or value.shape[1] != channels:
        raise ValueError(f"{name}: expected (B, {channels}, H, W) in [0, 1], got {tuple(value.shape)}")
    return value.float()


class LDMInpaintPipeline(DiffkernComponentsMixin, DiffusionPipeline):
    """vqvae (diffkern VQModel), unet (a UNet2DModel taking 2 * latent + 1 channels), scheduler
    (CompVis samples with DDIM: DDIMScheduler with steps_offset=1, set_alpha_to_one=False)."""

    model_cpu_offload_seq = "vqvae->unet->vqvae"

    def __init__(self, vqvae, unet, scheduler):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, image, mask_image, num_inference_steps: int = 50, eta: float = 0.0, generator=None,
                 latents=None, output_type: str = "pil", return_dict: bool = True):
        """Inpaint where mask_image is white (>= 0.5). image: PIL image(s) or (B, 3, H, W) in [0, 1];
        mask_image: PIL (L) or (B, 1, H, W) in [0, 1], the same size. latents: the initial noise
        (B, latent, H/f, W/f) instead of drawing it from `generator`. output_type "pil", "np" or "pt"."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: one of 'pil', 'np', 'pt', got {output_type!r}")
        device, dtype = self._execution_device, self.unet.dtype
        image = _as_tensor("image", image, 3).to(device)
        mask = _as_tensor("mask_image", mask_image, 1).to(device)
        if mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"mask_image: shape {tuple(mask.shape)} does not fit image {tuple(image.shape)}")
        mask = (mask >= 0.5).float()
        masked = (1 - mask) * image
        cond = self.vqvae.encode((masked * 2 - 1).to(self.vqvae.dtype)).latents
        small_mask = F.interpolate(mask * 2 - 1, size=cond.shape[-2:]).to(cond.dtype)
        cond = torch.cat([cond, small_mask], dim=1).to(dtype)
        shape = (image.shape[0], cond.shape[1] - 1) + tuple(cond.shape[2:])
        if self.unet.config.in_channels != 2 * shape[1] + 1:
            raise ValueError(f"unet: takes {self.unet.config.in_channels} channels, the inpainting input has "
                             f"{2 * shape[1] + 1} (latent {shape[1]} + masked-image latent {shape[1]} + "
                             "mask 1)")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(torch.cat([latents, cond], dim=1), t)
            eps = self.unet(x_in, t).sample
            latents = self.scheduler.step(eps, t, latents, **extra).prev_sample

        predicted = ((self.vqvae.decode(latents.to(self.vqvae.dtype)).sample.float() + 1) / 2).clamp(0, 1)
        out = (1 - mask) * image.clamp(0, 1) + mask * predicted
        if output_type != "pt":
            out = out.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)
