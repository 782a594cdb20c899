"""What the latent text-to-image pipelines share: components, schedulers, image in/out, the loop."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diffkern import schedulers
from diffkern.schedulers._base import randn_like_diffusers

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SCHEDULERS = {"ddim": schedulers.DDIMScheduler, "ddpm": schedulers.DDPMScheduler}


@dataclass
class ImagePipelineOutput:
    """`images`: a list of PIL images, a (B, H, W, 3) float32 array or a (B, 3, H, W) tensor in [0, 1]
    (or the final latents for output_type="latent")."""

    images: object

    def __getitem__(self, i):
        return (self.images,)[i]


def make_scheduler(scheduler, config):
    """A diffkern scheduler built from the checkpoint's scheduler `config` (diffusers' from_config
    semantics: keys of other schedulers are ignored): None means the class the config names
    (`_class_name`, e.g. PNDMScheduler for SD 1.5; DDIM when it names none diffkern has); a string is a
    diffusers class name or a short name of diffkern.schedulers.ALIASES ("ddim", "ddpm", "euler",
    "dpm++2m_karras", ...); an instance is used as it is.

    Instances must take `uncond_output` / `guidance_scale` in `step` (every diffkern scheduler does):
    the pipelines fuse the guidance combine into the step. Convert a diffusers scheduler with
    diffkern.schedulers.scheduler_class(type(s).__name__).from_config(s.config).
    """
    if scheduler is None:
        name = (config or {}).get("_class_name")
        cls = schedulers.SCHEDULERS.get(name, schedulers.DDIMScheduler) if isinstance(name, str) else \
            schedulers.DDIMScheduler
        return cls.from_config(config or {})
    if isinstance(scheduler, str):
        if scheduler in SCHEDULERS:
            return SCHEDULERS[scheduler].from_config(config or {})
        try:
            return schedulers.from_name(scheduler, config)
        except ValueError:
            raise ValueError(f"scheduler: expected one of {sorted(schedulers.ALIASES)}, a diffusers scheduler "
                             f"class name ({', '.join(sorted(schedulers.SCHEDULERS))}) or a scheduler, "
                             f"got {scheduler!r}") from None
    step = getattr(scheduler, "step", None)
    if step is None or "uncond_output" not in inspect.signature(step).parameters:
        raise TypeError(f"scheduler: expected a name or a diffkern scheduler (its step fuses the "
                        f"guidance), got {type(scheduler).__module__}.{type(scheduler).__name__}; convert a "
                        "diffusers one with diffkern.schedulers.scheduler_class(name).from_config(s.config)")
    return scheduler


def unet_forward(unet, x, t, context):
    """The UNet's prediction as a tensor (ours returns one; diffusers' returns an output with `[0]`)."""
    out = unet(x, t, encoder_hidden_states=context)
    return out if isinstance(out, torch.Tensor) else out[0]


def vae_decode(vae, z):
    out = vae.decode(z)
    return out if isinstance(out, torch.Tensor) else out[0]


def vae_scale_factor(vae):
    """Pixels per latent: 2 ** (levels - 1), 8 for every released SD / LDM autoencoder."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def postprocess(image, output_type):
    """VAE output in [-1, 1] -> images in [0, 1] as diffusers' VaeImageProcessor returns them."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


def preprocess_image(image, height, width, multiple):
    """An init image -> (B, 3, H, W) float32 in [-1, 1], H and W multiples of `multiple`.

    image: a PIL image or a list of them (resized with Lanczos, as diffusers); a float array
    (H, W, 3) / (B, H, W, 3) in [0, 1]; or a tensor (3, H, W) / (B, 3, H, W) in [0, 1] (one with
    negative values is taken as already in [-1, 1], as diffusers does). Without height/width the
    image's size rounded down to `multiple` is used; arrays and tensors are resized with nearest.
    """
    from PIL import Image

    images = image if isinstance(image, list) else [image]
    if images and all(isinstance(i, Image.Image) for i in images):
        h, w = _default_size(images[0].height, images[0].width, height, width, multiple)
        arrays = [np.asarray(i.convert("RGB").resize((w, h), Image.LANCZOS), dtype=np.float32) / 255.0
                  for i in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image[None] if image.ndim == 3 else image).permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image: expected a PIL image (or a list), an array or a tensor, "
                        f"got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected (B, 3, H, W) (or an (H, W, 3) array), "
                         f"got shape {tuple(image.shape)}")
    image = image.float()
    h, w = _default_size(image.shape[2], image.shape[3], height, width, multiple)
    if (h, w) != tuple(image.shape[2:]):
        image = F.interpolate(image, size=(h, w))
    return image if image.min() < 0 else image * 2 - 1


def _default_size(h, w, height, width, multiple):
    h = height if height is not None else h - h % multiple
    w = width if width is not None else w - w % multiple
    check_size(h, w, multiple)
    return h, w


def check_size(height, width, multiple):
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name}: must be a positive multiple of {multiple} (the VAE's downscale), "
                             f"got {v!r}")


def prompt_list(prompt, name="prompt"):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name}: expected a str or a non-empty list of str, got {prompt!r}")


def negative_list(negative_prompt, batch):
    """None -> "" per prompt; a str -> the same for every prompt; a list -> one per prompt."""
    if negative_prompt is None:
        return [""] * batch
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    negatives = prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt: got {len(negatives)} negative prompts for {batch} prompts")
    return negatives


def check_embeds(name, embeds, width=None):
    """Text embeddings given instead of a prompt: a (B, tokens, D) tensor, D = `width` when known."""
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or 0 in embeds.shape:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name}: expected a (batch, tokens, dim) tensor of text-encoder hidden states, "
                         f"got {got}")
    if width is not None and embeds.shape[2] != width:
        raise ValueError(f"{name}: expected dim {width} (the UNet's cross_attention_dim), "
                         f"got shape {tuple(embeds.shape)}")


def guided_model_fn(unet, context, guided, extra=None):
    """model_fn for the loop. With guidance, `context` is [uncond; cond] and each step is ONE UNet call
    on [x; x]; the pair (cond, uncond) goes to the scheduler, which fuses the combine into its step.
    `extra`: channels appended to the UNet's input at every step (inpainting's mask and masked-image
    latents), batched like that input ([extra; extra] under guidance)."""

    def model_fn(x, t):
        x_in = torch.cat([x, x]) if guided else x
        if extra is not None:
            x_in = torch.cat([x_in, extra], dim=1)
        out = unet_forward(unet, x_in, t, context)
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return cond, uncond

    return model_fn


def step_kwargs(scheduler, eta):
    """eta goes to schedulers whose step takes it (DDIM); others ignore it, as in diffusers."""
    return {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}


def initial_noise(shape, generator, device, dtype):
    """x_T drawn exactly as diffusers' pipelines draw it (same generator calls)."""
    return randn_like_diffusers(shape, generator, device, dtype)


def check_generator(generator, batch):
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"generator: got a list of {len(generator)} generators for {batch} images "
                         "(prompts x num_images_per_prompt)")
