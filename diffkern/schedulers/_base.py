"""What every diffkern scheduler adds to its diffusers parent: the fused step call, the parent-step
fallback (with the guidance combine a pipeline would do), extension config keys, and noise drawn as
diffusers draws it. Config, save / load, timetables and add_noise are the diffusers parent's own."""

from __future__ import annotations

import inspect
import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffkern import ops
from diffkern.schedulers.schedules import space_timesteps


def randn_like_diffusers(shape, generator, device, dtype):
    """diffusers' `randn_tensor` (same generator calls, so the same numbers), with a clear error for a
    generator list whose length is not the batch size."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1 and len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        generator = list(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)


def guide(model_output, uncond_output, guidance_scale, channels):
    """Classifier-free guidance as diffusers' pipelines combine it: uncond + w (cond - uncond) on the
    first `channels` channels; variance channels (learned-sigma models) from the conditional output."""
    combined = uncond_output[:, :channels] + guidance_scale * (model_output[:, :channels] - uncond_output[:, :channels])
    if model_output.shape[1] == channels:
        return combined
    return torch.cat([combined, model_output[:, channels:]], dim=1)


def with_extension_keys(parent, **extra):
    """An __init__ signature: the diffusers parent's, plus keyword-only extension keys with defaults.
    diffusers' from_config reads the accepted config keys from this signature."""
    params = list(inspect.signature(parent.__init__).parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()]
    return inspect.Signature(head + added + tail)


def init_respacing(scheduler, timestep_respacing):
    """The `timestep_respacing` extension key of DDPM / DDIM: recorded in the config only when used
    (diffusers warns on unknown keys), and the kept timesteps in `scheduler.use_timesteps`."""
    scheduler.use_timesteps = None
    if timestep_respacing is not None:
        scheduler.register_to_config(timestep_respacing=timestep_respacing)
        kept = space_timesteps(scheduler.config.num_train_timesteps, timestep_respacing)
        scheduler.use_timesteps = sorted(kept)


def coeff_rows(batch, values):
    """(B, len(values)) float32 coefficients computed in float64."""
    return torch.tensor([values], dtype=torch.float64).to(torch.float32).expand(batch, len(values)).contiguous()


def sqrt(x):
    return math.sqrt(max(x, 0.0))


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a VP sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha."""
    a = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return a, sigma * a


def log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t) (inf at sigma = 0)."""
    a, s = alpha_sigma(sigma)
    return math.inf if s == 0 else math.log(a) - math.log(s)


def threshold_fallback(config):
    """Why dynamic thresholding of this config is outside the fused op (its clamp [1, max] is empty when
    sample_max_value < 1, where torch.clamp returns max), or None."""
    if config.get("thresholding") and config.get("sample_max_value", 1.0) < 1:
        return f"thresholding with sample_max_value={config.sample_max_value} < 1"
    return None


class FusedStep:
    """Mixed in before a diffusers scheduler class. Subclasses override `step` to compute it with one
    fused op call and return `_output`; where an option is outside the op, `_parent_step` runs
    diffusers' own step (`fallback_reason` says which options those are)."""

    _output_cls = None  # diffusers' step output class of the parent
    _output_has_x0 = True  # whether that output carries pred_original_sample

    def fallback_reason(self, **step_kwargs):
        """Why `step` would run diffusers' step for this config and these step arguments, or None."""
        return None

    def _parent_step(self, model_output, timestep, sample, *args, uncond_output=None, guidance_scale=1.0,
                     **kwargs):
        """diffusers' own step (the parent class's), after combining guidance as a pipeline would."""
        if uncond_output is not None:
            model_output = guide(model_output, uncond_output, guidance_scale, sample.shape[1])
        return super().step(model_output, timestep, sample, *args, **kwargs)

    def _output(self, prev, x0, return_dict):
        if not self._output_has_x0:
            return self._output_cls(prev_sample=prev) if return_dict else (prev,)
        return self._output_cls(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def _sigma(self, i):
        """float(self.sigmas[i]) from a list cached per sigmas tensor (indexing a tensor per
        coefficient costs more than the rest of the step's Python)."""
        if getattr(self, "_sigma_src", None) is not self.sigmas:
            self._sigma_list = self.sigmas.tolist()
            self._sigma_src = self.sigmas
        return self._sigma_list[i]

    def _fused(self, sample, model_output, row, history=(), *, uncond_output=None, guidance_scale=1.0,
               noise=None, aux=False, clip="none", clip_range=1.0):
        """One sampler_update call with a per-batch coefficient row of python floats."""
        coeffs = torch.tensor([row] * sample.shape[0], dtype=torch.float32)  # rounded to float32 once, here
        if sample.device.type != "cpu":
            coeffs = coeffs.to(sample.device)
        cfg = self.config
        return ops.sampler_update(
            sample, model_output, coeffs, list(history), uncond_output=uncond_output,
            guidance_scale=guidance_scale, clip=clip, clip_range=clip_range,
            dynamic_percentile=cfg.get("dynamic_thresholding_ratio", 0.995),
            dynamic_max_value=cfg.get("sample_max_value", 1.0), noise=noise, aux=aux)

    def _guided(self, sample, model_output, coeffs, *, uncond_output, guidance_scale, noise, eps_from_clipped,
                variance="fixed"):
        """One guided_step call with this config's prediction type and clipping: (prev, x0).
        eps_from_clipped=False is diffusers' DDIM default (x0 clipped, eps from the raw prediction)."""
        cfg = self.config
        clip = "dynamic" if cfg.get("thresholding") else ("static" if cfg.get("clip_sample") else "none")
        return ops.guided_step(
            sample, model_output, coeffs.to(sample.device), uncond_output=uncond_output,
            guidance_scale=guidance_scale, prediction_type=cfg.prediction_type, clip=clip,
            clip_range=cfg.get("clip_sample_range", 1.0),
            dynamic_percentile=cfg.get("dynamic_thresholding_ratio", 0.995),
            dynamic_max_value=cfg.get("sample_max_value", 1.0), variance=variance, noise=noise,
            eps_from_clipped=eps_from_clipped)

    def _noise(self, shape, model_output, generator, variance_noise):
        """The step's noise: the caller's variance_noise, or drawn as diffusers draws it."""
        if variance_noise is not None and generator is not None:
            raise ValueError(f"{type(self).__name__}.step: pass generator or variance_noise, not both")
        if variance_noise is not None:
            return variance_noise
        return randn_like_diffusers(shape, generator, model_output.device, model_output.dtype)
