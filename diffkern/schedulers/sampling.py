"""A plain sampling loop over any scheduler with the diffusers step contract."""

from __future__ import annotations

import inspect

import torch

from diffkern.schedulers._base import randn_like_diffusers


def _progress(iterable, enabled, total):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: without it the loop runs without a bar
        return iterable
    return tqdm(iterable, total=total)


@torch.no_grad()
def sample_loop(
    model_fn,
    scheduler,
    shape,
    *,
    guidance_scale=None,
    generator=None,
    progress=True,
    num_inference_steps=None,
    device=None,
    dtype=torch.float32,
    x_T=None,
    step_kwargs=None,
    callback=None,
):
    """Run the reverse process from x_T ~ N(0, I) * init_noise_sigma and return x_0.

    Args:
        model_fn: (x, t) -> model output. With `guidance_scale` set it must return a pair
            (cond_output, uncond_output) and the guidance is fused into the scheduler step
            (uncond + w * (cond - uncond)); the caller decides how to batch the two passes.
        scheduler: a diffkern (or diffusers) scheduler; `set_timesteps(num_inference_steps,
            device=device)` is called first (num_inference_steps None is for respaced schedulers).
        shape: (B, C, *spatial) of the sample.
        generator: torch.Generator (or list, one per sample) for x_T and every step's noise, drawn
            as diffusers' pipelines draw them, so trajectories match theirs.
        progress: tqdm bar when tqdm is importable.
        x_T: start sample instead of drawing one. step_kwargs: extra `step` keywords (eta, ...).
        callback: called as callback(i, t, step_output) after every step.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    if x_T is None:
        x = randn_like_diffusers(tuple(shape), generator, device, dtype) * scheduler.init_noise_sigma
    else:
        x = x_T.to(device=device, dtype=dtype) if device is not None else x_T.to(dtype=dtype)
    return denoise_loop(model_fn, scheduler, x, scheduler.timesteps, guidance_scale=guidance_scale,
                        generator=generator, progress=progress, step_kwargs=step_kwargs, callback=callback)


@torch.no_grad()
def denoise_loop(model_fn, scheduler, x, timesteps, *, guidance_scale=None, generator=None, progress=True,
                 step_kwargs=None, callback=None):
    """The reverse process over `timesteps` (scheduler.timesteps, or a suffix of it: image-to-image
    starts mid-schedule) from the sample x; model_fn, guidance_scale, generator, step_kwargs and
    callback as in `sample_loop`, which is set_timesteps + x_T + this."""
    step_kwargs = dict(step_kwargs or {})
    begin = len(scheduler.timesteps) - len(timesteps)
    if hasattr(scheduler, "set_begin_index") and begin >= 0 and torch.equal(
            torch.as_tensor(scheduler.timesteps[begin:]).cpu(), torch.as_tensor(timesteps).cpu()):
        # a suffix of the schedule (image-to-image): say where it starts, as diffusers' pipelines do, so
        # step-indexed samplers need no lookup (ambiguous where a timestep repeats, e.g. Heun)
        scheduler.set_begin_index(begin)
    if "generator" in inspect.signature(scheduler.step).parameters:  # deterministic samplers take none
        step_kwargs["generator"] = generator
    for i, t in enumerate(_progress(timesteps, progress, len(timesteps))):
        x_in = scheduler.scale_model_input(x, t)
        if guidance_scale is None:
            out = scheduler.step(model_fn(x_in, t), t, x, **step_kwargs)
        else:
            cond, uncond = model_fn(x_in, t)
            out = scheduler.step(cond, t, x, uncond_output=uncond, guidance_scale=guidance_scale, **step_kwargs)
        x = out.prev_sample
        if callback is not None:
            callback(i, t, out)
    return x
