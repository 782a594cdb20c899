"""The stages the unCLIP pipelines share (prompt encoding, prior, decoder, super-resolution, output),
each written against the diffusers component contract so diffkern's or diffusers' models plug in.

Every denoising step is ONE model call on the [uncond; cond] batch and ONE scheduler step, in which
diffkern's UnCLIPScheduler fuses the guidance combine (guided_step's uncond_output / guidance_scale).
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch
import torch.nn.functional as F

from diffkern.schedulers import UnCLIPScheduler
from diffkern.schedulers._base import randn_like_diffusers

logger = logging.getLogger(__name__)


def tensor_of(out):
    """A model's prediction as a tensor: ours may return one, diffusers' an output object."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("sample", "predicted_image_embedding"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


def unclip_scheduler(scheduler, name):
    """diffkern's UnCLIPScheduler (or Karlo's own KarloSampler) as given, or built from another scheduler's
    config (a diffusers UnCLIPScheduler converts by its config: same semantics, fused steps)."""
    if isinstance(scheduler, UnCLIPScheduler):
        return scheduler
    from diffkern.models.checkpoints.karlo import KarloSampler

    if isinstance(scheduler, KarloSampler):  # Karlo's own sampler (load_karlo, original files): kept as given
        return scheduler
    config = getattr(scheduler, "config", scheduler if isinstance(scheduler, dict) else None)
    if config is None:
        raise TypeError(f"{name}: expected an UnCLIPScheduler (or its config), got {type(scheduler).__name__}")
    return UnCLIPScheduler.from_config(dict(config))


def module_device(module):
    return next(module.parameters()).device


def prepare_latents(shape, dtype, device, generator, latents, scheduler, name):
    """Initial noise drawn as diffusers' unCLIP pipelines draw it (randn_tensor), or `latents` checked."""
    if latents is None:
        latents = randn_like_diffusers(shape, generator, device, dtype)
    else:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != tuple(shape):
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {got}")
        latents = latents.to(device)
    return latents * scheduler.init_noise_sigma


def _tokens(tokenizer, prompts, device, truncation):
    out = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=truncation,
                    return_tensors="pt")
    return out.input_ids, out.attention_mask.bool().to(device)


def encode_prompt(text_encoder, tokenizer, prompts, device, num_images_per_prompt, guided, text_model_output=None,
                  text_attention_mask=None, warn_truncation=True):
    """(prompt_embeds (B', D), text hidden states (B', 77, D), text mask (B', 77) bool), B' = 2 x B x n
    under guidance with the empty prompt's rows first, as diffusers' UnCLIPPipeline._encode_prompt."""
    if text_model_output is None:
        ids, mask = _tokens(tokenizer, prompts, device, truncation=True)
        if warn_truncation:
            full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
                removed = tokenizer.batch_decode(full[:, tokenizer.model_max_length - 1:-1])
                logger.warning("The following part of your input was truncated because CLIP can only handle "
                               f"sequences up to {tokenizer.model_max_length} tokens: {removed}")
        out = text_encoder(ids.to(device))
        embeds, hidden = out.text_embeds, out.last_hidden_state
        batch = len(prompts)
    else:
        embeds, hidden = text_model_output[0], text_model_output[1]
        if text_attention_mask is None:
            raise ValueError("text_attention_mask: required together with text_model_output")
        if embeds.dim() != 2 or hidden.dim() != 3 or hidden.shape[0] != embeds.shape[0]:
            raise ValueError(f"text_model_output: expected (text_embeds (B, D), last_hidden_state (B, T, D)), got "
                             f"{tuple(embeds.shape)} and {tuple(hidden.shape)}")
        if tuple(text_attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"text_attention_mask: expected shape {tuple(hidden.shape[:2])}, "
                             f"got {tuple(text_attention_mask.shape)}")
        mask, batch = text_attention_mask, embeds.shape[0]
    n = num_images_per_prompt
    embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask))
    if guided:
        u_ids, u_mask = _tokens(tokenizer, [""] * batch, device, truncation=True)
        u = text_encoder(u_ids.to(device))
        embeds = torch.cat([u.text_embeds.repeat_interleave(n, dim=0), embeds])
        hidden = torch.cat([u.last_hidden_state.repeat_interleave(n, dim=0), hidden])
        mask = torch.cat([u_mask.repeat_interleave(n, dim=0), mask])
    return embeds, hidden, mask


def _split_guided(out, guided):
    return out.chunk(2)[::-1] if guided else (out, None)


def run_prior(prior, scheduler, prompt_embeds, hidden, mask, *, steps, guidance_scale, guided, generator, latents):
    """Sample the normalised CLIP image embedding, then de-normalise it (post_process_latents)."""
    device = prompt_embeds.device
    scheduler.set_timesteps(steps, device=device)
    batch = prompt_embeds.shape[0] // (2 if guided else 1)
    x = prepare_latents((batch, prior.config.embedding_dim), prompt_embeds.dtype, device, generator, latents,
                        scheduler, "prior_latents")
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x, x]) if guided else x
        out = tensor_of(prior(x_in, timestep=t, proj_embedding=prompt_embeds, encoder_hidden_states=hidden,
                              attention_mask=mask))
        cond, uncond = _split_guided(out, guided)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler.step(cond, t, x, prev_timestep=prev, generator=generator, uncond_output=uncond,
                           guidance_scale=guidance_scale).prev_sample
    return prior.post_process_latents(x)


def decoder_conditioning(text_proj, image_embeddings, prompt_embeds, hidden, mask, guided):
    """(context tokens, additive time embedding, context mask with the extra CLIP tokens visible)."""
    context, time_emb = text_proj(image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
                                  text_encoder_hidden_states=hidden, do_classifier_free_guidance=guided)
    mask = F.pad(mask, (text_proj.clip_extra_context_tokens, 0), value=True)
    return context, time_emb, mask


def decoder_model_fn(decoder, context, time_emb, mask, guided):
    """(x, t) -> (cond, uncond or None): one decoder call on [x; x] under guidance."""

    def fn(x, t):
        x_in = torch.cat([x, x]) if guided else x
        out = tensor_of(decoder(sample=x_in, timestep=t, encoder_hidden_states=context, class_labels=time_emb,
                                attention_mask=mask))
        return _split_guided(out, guided)

    return fn


def run_decoder(decoder, scheduler, model_fn, batch, dtype, *, steps, guidance_scale, generator, latents,
                scale_latents=True):
    """64x64 images from the decoder (learned-range variance), clamped to [-1, 1]."""
    device = module_device(decoder)
    scheduler.set_timesteps(steps, device=device)
    size = decoder.config.sample_size
    shape = (batch, decoder.config.in_channels, size, size)
    if latents is not None and not scale_latents:  # the variation pipeline takes given latents as they are
        if tuple(latents.shape) != shape:
            raise ValueError(f"decoder_latents: expected shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device)
    else:
        x = prepare_latents(shape, dtype, device, generator, latents, scheduler, "decoder_latents")
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        cond, uncond = model_fn(x, t)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler.step(cond, t, x, prev_timestep=prev, generator=generator, uncond_output=uncond,
                           guidance_scale=guidance_scale).prev_sample
    return x.clamp(-1, 1)


def upsample_bicubic(image_small, size):
    """diffusers' conditioning image for the SR models: antialiased bicubic to (size, size)."""
    kw = {"antialias": True} if "antialias" in inspect.signature(F.interpolate).parameters else {}
    return F.interpolate(image_small, size=[size, size], mode="bicubic", align_corners=False, **kw)


def run_super_res(first, last, scheduler, image_small, *, steps, generator, latents, scale_latents=True):
    """64 -> 256: `first` for every step but the last, `last` for the last (Karlo's improved SR)."""
    device = image_small.device
    scheduler.set_timesteps(steps, device=device)
    size = first.config.sample_size
    shape = (image_small.shape[0], first.config.in_channels // 2, size, size)
    if latents is not None and not scale_latents:
        if tuple(latents.shape) != shape:
            raise ValueError(f"super_res_latents: expected shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(device)
    else:
        x = prepare_latents(shape, image_small.dtype, device, generator, latents, scheduler, "super_res_latents")
    upscaled = upsample_bicubic(image_small, size)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        unet = last if i == len(timesteps) - 1 else first
        eps = tensor_of(unet(sample=torch.cat([x, upscaled], dim=1), timestep=t))
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler.step(eps, t, x, prev_timestep=prev, generator=generator).prev_sample
    return x


def to_output(image, output_type):
    """[-1, 1] -> [0, 1]; "pil": PIL images, "pt": the (B, 3, H, W) tensor, else a (B, H, W, 3) array."""
    image = (image * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type != "pil":
        return array
    from PIL import Image

    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
