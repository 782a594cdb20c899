"""Euler and Euler ancestral samplers (Karras et al. 2022, Algorithm 2; k-diffusion's sample_euler /
sample_euler_ancestral): diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler with
the step computed by one fused sampler_update call."""

from __future__ import annotations

import math

import diffusers
import torch
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput, logger

from diffkern.schedulers._base import FusedStep


def x0_coeffs(prediction_type, sigma):
    """(cx, cp) of the denoised value x0 = cx x + cp pred in sigma space (k-diffusion's c_skip, c_out)."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    return 0.0, 1.0  # sample


class _KarrasStep(FusedStep):
    """The preamble diffusers' Euler-type steps share: refuse integer indices, warn when
    scale_model_input was not called, find the step index."""

    def _begin_step(self, timestep):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                f" `{type(self).__name__}.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep.")
        if self.step_index is None:
            self._init_step_index(timestep)

    def _warn_unscaled(self):
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example.")


class EulerDiscreteScheduler(_KarrasStep, diffusers.EulerDiscreteScheduler):
    """diffusers' EulerDiscreteScheduler; `step` is one fused sampler_update call
    (x_next = x + (sigma_next - sigma) (x - x0) / sigma) and also takes `uncond_output` +
    `guidance_scale`. Churn (s_churn > 0 inside [s_tmin, s_tmax]) runs diffusers' step."""

    _output_cls = EulerDiscreteSchedulerOutput

    def fallback_reason(self, gamma=0.0, **step_kwargs):
        pt = self.config.prediction_type
        if pt not in ("epsilon", "v_prediction", "sample", "original_sample"):
            return f"prediction_type={pt!r}"
        if gamma > 0:
            return "s_churn > 0 (noise added to the sample before the model's x0)"
        return None

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One Euler step; returns (prev_sample, pred_original_sample)."""
        self._begin_step(timestep)
        sigma = self._sigma(self.step_index)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        if self.fallback_reason(gamma=gamma) is not None:
            return self._parent_step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                     return_dict, uncond_output=uncond_output, guidance_scale=guidance_scale)
        self._warn_unscaled()
        out_dtype = model_output.dtype
        x = sample.to(torch.float32)
        if model_output.dtype != x.dtype:
            model_output = model_output.to(x.dtype)
            uncond_output = None if uncond_output is None else uncond_output.to(x.dtype)
        cx, cp = x0_coeffs(self.config.prediction_type, sigma)
        k = (self._sigma(self.step_index + 1) - sigma) / sigma
        prev, x0 = self._fused(x, model_output, [cx, cp, 1.0 + k, -k, 0.0], uncond_output=uncond_output,
                               guidance_scale=guidance_scale)
        self._step_index += 1
        return self._output(prev.to(out_dtype), x0, return_dict)


class EulerAncestralDiscreteScheduler(_KarrasStep, diffusers.EulerAncestralDiscreteScheduler):
    """diffusers' EulerAncestralDiscreteScheduler; `step` (an Euler step to sigma_down, then noise of
    std sigma_up, drawn at every step as diffusers does) is one fused sampler_update call and also
    takes `uncond_output` + `guidance_scale` and `variance_noise` (instead of drawing from `generator`)."""

    _output_cls = EulerAncestralDiscreteSchedulerOutput

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return None if pt in ("epsilon", "v_prediction") else f"prediction_type={pt!r}"

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, *, uncond_output=None,
             guidance_scale=1.0, variance_noise=None):
        """One ancestral step; returns (prev_sample, pred_original_sample)."""
        if self.fallback_reason() is not None:
            if variance_noise is not None:
                raise ValueError(f"{type(self).__name__}: variance_noise is not taken with {self.fallback_reason()}")
            return self._parent_step(model_output, timestep, sample, generator, return_dict,
                                     uncond_output=uncond_output, guidance_scale=guidance_scale)
        self._begin_step(timestep)
        self._warn_unscaled()
        i = self.step_index
        s_from, s_to = self._sigma(i), self._sigma(i + 1)
        sigma_up = math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0))
        sigma_down = math.sqrt(max(s_to**2 - sigma_up**2, 0.0))
        out_dtype = model_output.dtype
        noise = self._noise(model_output.shape, model_output, generator, variance_noise)
        x = sample.to(torch.float32)
        if model_output.dtype != x.dtype:
            model_output, noise = model_output.to(x.dtype), noise.to(x.dtype)
            uncond_output = None if uncond_output is None else uncond_output.to(x.dtype)
        cx, cp = x0_coeffs(self.config.prediction_type, s_from)
        k = (sigma_down - s_from) / s_from
        prev, x0 = self._fused(x, model_output, [cx, cp, 1.0 + k, -k, sigma_up], uncond_output=uncond_output,
                               guidance_scale=guidance_scale, noise=noise)
        self._step_index += 1
        return self._output(prev.to(out_dtype), x0, return_dict)
