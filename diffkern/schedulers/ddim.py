"""DDIM sampling and inversion (Song et al. 2021, eq. 12), drop-ins for diffusers' DDIMScheduler
and DDIMInverseScheduler."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from diffkern.schedulers._base import _Scheduler, coeff_rows, sqrt

_DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
    "timestep_respacing": None,
}


class DDIMScheduler(_Scheduler):
    """DDIM sampler honouring diffusers' DDIMScheduler contract; each step is one fused guided_step.

    Config: diffusers' DDIMScheduler keys plus `timestep_respacing` (improved-DDPM section counts,
    e.g. "ddim50"; set_timesteps then runs the kept steps, each stepping to the previous kept one,
    the last to abar = 1 or abar_0 per set_alpha_to_one). Without respacing the previous timestep is
    t - num_train_timesteps // num_inference_steps, exactly as diffusers does for every spacing.

    A model_output with 2C channels (learned-sigma models such as GLIDE's) is accepted: DDIM ignores
    the variance channels, as improved DDPM's ddim_sample does. `step` also takes
    `uncond_output` and `guidance_scale` (classifier-free guidance in the same fused op).
    """

    _defaults: ClassVar[dict] = dict(_DDIM_DEFAULTS)

    def _post_init(self):
        acp0 = float(self.alphas_cumprod[0])
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else torch.tensor(acp0)
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps=None, device=None):
        """Choose the inference timesteps (evenly spaced per `timestep_spacing`, or the respaced ones)."""
        if self.use_timesteps is not None:
            self._respaced_timesteps(num_inference_steps, device)
        else:
            self._spaced_timesteps(num_inference_steps, device)

    def _prev_timestep(self, t):
        if self.use_timesteps is not None:
            i = self.use_timesteps.index(t) if t in self.use_timesteps else None
            if i is None:
                raise ValueError(f"DDIMScheduler.step: timestep {t} is not one of the respaced timesteps")
            return self.use_timesteps[i - 1] if i > 0 else -1
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def step_coefficients(self, timestep, batch=1, eta=0.0):
        """(B, 6) float32 [sa, s1m, c_x0, c_xt, c_eps, sigma] of one DDIM step with this eta."""
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler: call set_timesteps before step")
        t = int(timestep)
        prev_t = self._prev_timestep(t)
        a_t = self._abar(t)
        a_prev = self._abar(prev_t) if prev_t >= 0 else float(self.final_alpha_cumprod)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * sqrt(var)
        return coeff_rows(
            batch,
            [math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev), 0.0, sqrt(1 - a_prev - std**2), std],
        )

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta=0.0,
        use_clipped_model_output=False,
        generator=None,
        variance_noise=None,
        return_dict=True,
        *,
        uncond_output=None,
        guidance_scale=1.0,
    ):
        """One DDIM step x_t -> x_prev; with eta > 0 noise is drawn as diffusers draws it."""
        C = sample.shape[1]
        if model_output.shape[1] == 2 * C:
            model_output = model_output[:, :C]
            uncond_output = None if uncond_output is None else uncond_output[:, :C]
        elif model_output.shape[1] != C:
            raise ValueError(
                f"DDIMScheduler: model_output must have {C} (or {2 * C}) channels, "
                f"got {model_output.shape[1]}"
            )
        coeffs = self.step_coefficients(timestep, sample.shape[0], eta)
        noise = None
        if eta > 0:
            noise = self._noise(model_output.shape, model_output, generator, variance_noise)
        return self._call_step(
            sample,
            model_output,
            coeffs,
            uncond_output=uncond_output,
            guidance_scale=guidance_scale,
            noise=noise,
            eps_from_clipped=bool(use_clipped_model_output),
            return_dict=return_dict,
        )


class DDIMInverseScheduler(_Scheduler):
    """Deterministic DDIM inversion x_t -> x_{t+k} (diffusers' DDIMInverseScheduler contract).

    Timesteps ascend; step maps the sample at the previous timestep t - k (abar = 1 or abar_0 before
    the first, per set_alpha_to_one) to `timestep`. Spacing: leading or trailing, as diffusers.
    """

    _defaults: ClassVar[dict] = {
        k: v
        for k, v in _DDIM_DEFAULTS.items()
        if k not in ("thresholding", "dynamic_thresholding_ratio", "sample_max_value", "timestep_respacing")
    }
    _spacings = ("leading", "trailing")

    def _post_init(self):
        acp0 = float(self.alphas_cumprod[0])
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else torch.tensor(acp0)
        self.timesteps = torch.arange(0, self.config.num_train_timesteps, dtype=torch.int64)

    def set_timesteps(self, num_inference_steps, device=None):
        """Ascending inference timesteps (leading or trailing spacing)."""
        self._spaced_timesteps(num_inference_steps, device, reverse=False)

    def step_coefficients(self, timestep, batch=1):
        """(B, 6) float32 coefficients of one inversion step into `timestep`."""
        if self.num_inference_steps is None:
            raise ValueError("DDIMInverseScheduler: call set_timesteps before step")
        N = self.config.num_train_timesteps
        t_next = int(timestep)
        t = min(t_next - N // self.num_inference_steps, N - 1)
        a_t = self._abar(t) if t >= 0 else float(self.initial_alpha_cumprod)
        a_next = self._abar(t_next)
        return coeff_rows(
            batch, [math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_next), 0.0, math.sqrt(1 - a_next), 0.0]
        )

    def step(
        self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0
    ):
        """One inversion step towards noise; returns prev_sample (the noisier sample) and x0."""
        coeffs = self.step_coefficients(timestep, sample.shape[0])
        return self._call_step(
            sample,
            model_output,
            coeffs,
            uncond_output=uncond_output,
            guidance_scale=guidance_scale,
            noise=None,
            eps_from_clipped=False,
            return_dict=return_dict,
        )
