"""DDIM sampling and inversion (Song et al. 2021, eq. 12): diffusers' DDIMScheduler and
DDIMInverseScheduler with the step computed by one fused guided_step call."""

from __future__ import annotations

import math

import diffusers
import torch
from diffusers.schedulers import scheduling_ddim_inverse
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from diffkern.schedulers._base import (FusedStep, coeff_rows, init_respacing, sqrt, threshold_fallback,
                                       with_extension_keys)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDIMScheduler(FusedStep, diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler; `step` is one fused guided_step call and also takes `uncond_output` +
    `guidance_scale` (classifier-free guidance in the same op).

    Extension key `timestep_respacing` (improved-DDPM section counts, e.g. "ddim50", "fast27"):
    set_timesteps then runs the kept steps, each stepping to the previous kept one, the last to
    abar = 1 or abar_0 per set_alpha_to_one. A model_output with 2C channels (learned-sigma models
    such as GLIDE's) is accepted: DDIM ignores the variance channels, as improved DDPM's ddim_sample.
    """

    _output_cls = DDIMSchedulerOutput

    def __init__(self, *args, timestep_respacing=None, **kwargs):
        super().__init__(*args, **kwargs)
        init_respacing(self, timestep_respacing)

    __init__.__signature__ = with_extension_keys(diffusers.DDIMScheduler, timestep_respacing=None)

    def set_timesteps(self, num_inference_steps=None, device=None):
        """diffusers' set_timesteps; with `timestep_respacing` the respaced timesteps."""
        if self.use_timesteps is None:
            return super().set_timesteps(num_inference_steps, device)
        kept = self.use_timesteps
        if num_inference_steps is not None and num_inference_steps != len(kept):
            raise ValueError(
                f"DDIMScheduler: timestep_respacing={self.config.timestep_respacing!r} keeps {len(kept)} steps; "
                f"call set_timesteps(None) or with that number, got {num_inference_steps}")
        self.num_inference_steps = len(kept)
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.int64, device=device)

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return threshold_fallback(self.config) if pt in PREDICTION_TYPES else f"prediction_type={pt!r}"

    def _prev_timestep(self, t):
        if self.use_timesteps is not None:
            if t not in self.use_timesteps:
                raise ValueError(f"DDIMScheduler.step: timestep {t} is not one of the respaced timesteps")
            i = self.use_timesteps.index(t)
            return self.use_timesteps[i - 1] if i > 0 else -1
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def step_coefficients(self, timestep, batch=1, eta=0.0):
        """(B, 6) float32 [sa, s1m, c_x0, c_xt, c_eps, sigma] of one DDIM step with this eta."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        t = int(timestep)
        prev_t = self._prev_timestep(t)
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else float(self.final_alpha_cumprod)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * sqrt(var)
        return coeff_rows(
            batch, [math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev), 0.0, sqrt(1 - a_prev - std**2), std])

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One DDIM step x_t -> x_prev; with eta > 0 noise is drawn as diffusers draws it."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                     variance_noise, return_dict, uncond_output=uncond_output,
                                     guidance_scale=guidance_scale)
        C = sample.shape[1]
        if model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
            uncond_output = None if uncond_output is None else uncond_output[:, :C]
        elif model_output.shape[1] != C:
            raise ValueError(f"DDIMScheduler: model_output must have {C} (or {2 * C}) channels, "
                             f"got {model_output.shape[1]}")
        coeffs = self.step_coefficients(timestep, sample.shape[0], eta)
        noise = self._noise(model_output.shape, model_output, generator, variance_noise) if eta > 0 else None
        prev, x0 = self._guided(sample, model_output, coeffs, uncond_output=uncond_output,
                                guidance_scale=guidance_scale, noise=noise,
                                eps_from_clipped=bool(use_clipped_model_output))
        return self._output(prev, x0, return_dict)


class DDIMInverseScheduler(FusedStep, diffusers.DDIMInverseScheduler):
    """diffusers' DDIMInverseScheduler (deterministic inversion x_t -> x_{t+k}); `step` is one fused
    guided_step call and also takes `uncond_output` + `guidance_scale`."""

    _output_cls = scheduling_ddim_inverse.DDIMSchedulerOutput  # a class of its own in diffusers

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return None if pt in PREDICTION_TYPES else f"prediction_type={pt!r}"

    def step_coefficients(self, timestep, batch=1):
        """(B, 6) float32 coefficients of one inversion step into `timestep`."""
        N = self.config.num_train_timesteps
        t_next = int(timestep)
        t = min(t_next - N // self.num_inference_steps, N - 1)
        a_t = float(self.alphas_cumprod[t]) if t >= 0 else float(self.initial_alpha_cumprod)
        a_next = float(self.alphas_cumprod[t_next])
        return coeff_rows(
            batch, [math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_next), 0.0, math.sqrt(1 - a_next), 0.0])

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One inversion step towards noise; returns (prev_sample, pred_original_sample) as diffusers."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, return_dict, uncond_output=uncond_output,
                                     guidance_scale=guidance_scale)
        coeffs = self.step_coefficients(timestep, sample.shape[0])
        prev, x0 = self._guided(sample, model_output, coeffs, uncond_output=uncond_output,
                                guidance_scale=guidance_scale, noise=None, eps_from_clipped=False)
        return self._output(prev, x0, return_dict)
