"""DDPM ancestral sampling (Ho et al. 2020, eq. 6-7), a drop-in for diffusers' DDPMScheduler."""

from __future__ import annotations

import itertools
import math
from typing import ClassVar

import torch

from diffkern.schedulers._base import _Scheduler, coeff_rows, sqrt

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
_UNSUPPORTED_VARIANCES = {
    "fixed_large_log": "diffusers computes sqrt(log(beta)) for it, which is NaN; use fixed_large",
    "learned": "the fused step only takes learned_range (interpolated log-variance); use learned_range",
}


class DDPMScheduler(_Scheduler):
    """DDPM sampler honouring diffusers' DDPMScheduler contract; each step is one fused guided_step.

    Config: diffusers' DDPMScheduler keys (num_train_timesteps, beta_start, beta_end, beta_schedule,
    trained_betas, variance_type, clip_sample, prediction_type, thresholding,
    dynamic_thresholding_ratio, clip_sample_range, sample_max_value, timestep_spacing, steps_offset,
    rescale_betas_zero_snr) plus `timestep_respacing` (improved-DDPM / GLIDE section counts such
    as "100", "ddim50", "fast27", "10,10,10"; the kept timesteps define new betas
    1 - abar_t / abar_prev, and set_timesteps runs exactly those steps).

    variance_type: fixed_small (posterior variance), fixed_small_log (same std), fixed_large (beta_t)
    or learned_range (model_output has 2C channels; the last C interpolate the log-variance
    between those two, as improved DDPM). `step` also accepts `uncond_output` and
    `guidance_scale` for classifier-free guidance fused into the same op.
    """

    _defaults: ClassVar[dict] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "timestep_respacing": None,
    }

    def _validate(self, cfg):
        super()._validate(cfg)
        vt = cfg["variance_type"]
        if vt in _UNSUPPORTED_VARIANCES:
            raise NotImplementedError(
                f"DDPMScheduler: variance_type={vt!r} is not supported: {_UNSUPPORTED_VARIANCES[vt]}"
            )
        if vt not in VARIANCE_TYPES:
            raise ValueError(f"DDPMScheduler: variance_type must be one of {VARIANCE_TYPES}, got {vt!r}")

    def _post_init(self):
        self.variance_type = self.config.variance_type
        self.custom_timesteps = False
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        if self.use_timesteps is not None:
            self._respaced_timesteps(None, None)
            self.custom_timesteps = True

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Choose the inference timesteps: evenly spaced per `timestep_spacing`, custom descending
        `timesteps`, or (with `timestep_respacing`) the respaced ones."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("DDPMScheduler.set_timesteps: pass num_inference_steps or timesteps, not both")
        if self.use_timesteps is not None:
            if timesteps is not None:
                raise ValueError(
                    "DDPMScheduler.set_timesteps: custom timesteps conflict with timestep_respacing"
                )
            self._respaced_timesteps(num_inference_steps, device)
            self.custom_timesteps = True
            return
        if timesteps is not None:
            ts = [int(t) for t in timesteps]
            if any(b >= a for a, b in itertools.pairwise(ts)):
                raise ValueError("DDPMScheduler.set_timesteps: custom timesteps must be in descending order")
            if ts[0] >= self.config.num_train_timesteps or ts[-1] < 0:
                raise ValueError(
                    "DDPMScheduler.set_timesteps: timesteps must lie in "
                    f"[0, {self.config.num_train_timesteps})"
                )
            self.timesteps = torch.tensor(ts, dtype=torch.int64, device=device)
            self.custom_timesteps = True
            self.num_inference_steps = None
            return
        if num_inference_steps is None:
            raise ValueError("DDPMScheduler.set_timesteps: num_inference_steps is required")
        self.custom_timesteps = False
        self._spaced_timesteps(num_inference_steps, device)

    def previous_timestep(self, timestep):
        """The timestep after `timestep` in the sampling order (-1 after the last)."""
        t = int(timestep)
        if self.custom_timesteps or self.num_inference_steps:
            ts = self.timesteps.tolist()
            if t not in ts:
                raise ValueError(f"DDPMScheduler.step: timestep {t} is not in scheduler.timesteps")
            i = ts.index(t)
            return ts[i + 1] if i + 1 < len(ts) else -1
        return t - 1

    def step_coefficients(self, timestep, batch=1):
        """(B, 6) or (B, 8) float32 [sa, s1m, c_x0, c_xt, c_eps, sigma(, min_log, max_log)] of one step."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        a_t = self._abar(t)
        a_prev = self._abar(prev_t) if prev_t >= 0 else 1.0
        beta_t = 1 - a_t / a_prev
        c_x0 = math.sqrt(a_prev) * beta_t / (1 - a_t)
        c_xt = sqrt(1 - beta_t) * (1 - a_prev) / (1 - a_t)
        var = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
        vt = self.variance_type
        sigma = 0.0 if t == 0 else (math.sqrt(beta_t) if vt == "fixed_large" else math.sqrt(var))
        row = [math.sqrt(a_t), math.sqrt(1 - a_t), c_x0, c_xt, 0.0, sigma]
        if vt == "learned_range":
            row += [math.log(var), math.log(beta_t) if beta_t > 0 else -math.inf]
        return coeff_rows(batch, row)

    def step(
        self,
        model_output,
        timestep,
        sample,
        generator=None,
        return_dict=True,
        *,
        uncond_output=None,
        guidance_scale=1.0,
        variance_noise=None,
    ):
        """One reverse step x_t -> x_{t-1}; noise drawn as diffusers draws it (none at t = 0)."""
        t = int(timestep)
        C = sample.shape[1]
        learned = self.variance_type == "learned_range"
        if learned and model_output.shape[1] != 2 * C:
            raise ValueError(
                f"DDPMScheduler: variance_type='learned_range' needs model_output with 2*C={2 * C} "
                f"channels (prediction, variance), got {model_output.shape[1]}"
            )
        if not learned and model_output.shape[1] != C:
            raise ValueError(
                f"DDPMScheduler: model_output must have the sample's {C} channels for variance_type="
                f"{self.variance_type!r}, got {model_output.shape[1]}"
            )
        coeffs = self.step_coefficients(t, sample.shape[0])
        return self._ancestral_step(sample, model_output, coeffs, t, uncond_output=uncond_output,
                                    guidance_scale=guidance_scale, generator=generator,
                                    variance_noise=variance_noise, return_dict=return_dict, learned=learned)
