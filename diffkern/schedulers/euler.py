"""Euler and Euler ancestral samplers (Karras et al. 2022, Algorithm 2; k-diffusion's
sample_euler / sample_euler_ancestral), drop-ins for diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler. Each step is one fused sampler_update call."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._sigmas import _KarrasSigmaScheduler, spaced_timesteps

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


class EulerDiscreteScheduler(_KarrasSigmaScheduler):
    """Euler sampler with diffusers' EulerDiscreteScheduler config and step contract.

    x_next = x + (sigma_next - sigma_hat) (x - x0) / sigma_hat, x0 from the prediction type; with
    s_churn > 0 the sample is first lifted to sigma_hat = sigma (1 + gamma) with fresh noise. `step`
    also takes `uncond_output` + `guidance_scale` (classifier-free guidance fused into the op).
    Not supported (NotImplementedError): use_beta_sigmas (needs scipy's beta ppf),
    interpolation_type="log_linear".
    """

    _defaults: ClassVar[dict] = {
        **_COMMON,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }
    _unsupported: ClassVar[dict] = {
        "use_beta_sigmas": (False, "needs scipy's beta distribution"),
        "interpolation_type": ("linear", "only linear interpolation of the training sigmas"),
    }

    def _validate(self, cfg):
        super()._validate(cfg)
        if cfg["timestep_type"] not in ("discrete", "continuous"):
            raise ValueError(f"EulerDiscreteScheduler: timestep_type must be 'discrete' or 'continuous', "
                             f"got {cfg['timestep_type']!r}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"EulerDiscreteScheduler: final_sigmas_type must be 'zero' or 'sigma_min', "
                             f"got {cfg['final_sigmas_type']!r}")

    def _continuous_v(self):
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def _post_init(self):
        super()._post_init()
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * s.log() for s in self.sigmas[:-1]])

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """Inference sigmas from a step count (spacing + Karras / exponential), or custom descending
        `timesteps`, or custom `sigmas` (the last one is the final sigma)."""
        cfg = self.config
        given = [v is not None for v in (num_inference_steps, timesteps, sigmas)]
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if sum(given) != 1:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError("Cannot set `timesteps` with `config.use_karras_sigmas` / `use_exponential_sigmas`.")
        if timesteps is not None and self._continuous_v():
            raise ValueError("Cannot set `timesteps` with timestep_type='continuous' and v_prediction.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        elif isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        if sigmas is not None:
            _, log_sigmas = self._train_sigmas()
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = np.array([self._sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                             cfg.steps_offset)
            sigmas, timesteps = self._sigmas_for(timesteps, num_inference_steps)
            if cfg.final_sigmas_type == "sigma_min":
                a0 = self.alphas_cumprod[0]
                last = ((1 - a0) / a0) ** 0.5
            else:
                last = 0
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self._reset_index()
        self.sigmas = sigmas.to("cpu")

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        from diffkern.schedulers._sigmas import sigma_to_t

        return sigma_to_t(sigma, log_sigmas)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One Euler step; returns (prev_sample, pred_original_sample)."""
        self._check_timestep(timestep)
        self._warn_unscaled()
        i = self.step_index
        sigma = self._sigma(i)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        out_dtype = model_output.dtype
        x = sample.to(torch.float32)
        if gamma > 0:  # churn: lift the sample to sigma_hat first (one extra pass, a rarely used option)
            noise = self._noise(model_output.shape, model_output, generator, None)
            x = x + (noise * s_noise) * (sigma_hat**2 - sigma**2) ** 0.5
        if model_output.dtype != x.dtype:
            model_output = model_output.to(x.dtype)
            uncond_output = None if uncond_output is None else uncond_output.to(x.dtype)
        cx, cp = self._x0_coeffs(sigma)
        if self.config.prediction_type == "epsilon":
            cp = -sigma_hat
        dt = self._sigma(i + 1) - sigma_hat
        k = dt / sigma_hat
        prev, x0 = self._fused(x, model_output, [cx, cp, 1.0 + k, -k, 0.0], uncond_output=uncond_output,
                               guidance_scale=guidance_scale)
        self._step_index += 1
        return self._output(prev.to(out_dtype), x0, return_dict)


class EulerAncestralDiscreteScheduler(_KarrasSigmaScheduler):
    """Euler ancestral sampler with diffusers' EulerAncestralDiscreteScheduler config and contract:
    an Euler step to sigma_down, then noise of std sigma_up (drawn at every step, as diffusers does,
    so that the generator advances identically). Prediction types epsilon and v_prediction."""

    _defaults: ClassVar[dict] = dict(_COMMON)
    _prediction_types = ("epsilon", "v_prediction", "sample")

    def set_timesteps(self, num_inference_steps, device=None):
        """Evenly spaced timesteps (per timestep_spacing) and their interpolated sigmas, then 0."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                     cfg.steps_offset)
        sigmas, _ = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_index()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, *, uncond_output=None,
             guidance_scale=1.0, variance_noise=None):
        """One ancestral step; returns (prev_sample, pred_original_sample)."""
        self._check_timestep(timestep)
        self._warn_unscaled()
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
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
        cx, cp = self._x0_coeffs(s_from)
        k = (sigma_down - s_from) / s_from
        prev, x0 = self._fused(x, model_output, [cx, cp, 1.0 + k, -k, sigma_up], uncond_output=uncond_output,
                               guidance_scale=guidance_scale, noise=noise)
        self._step_index += 1
        return self._output(prev.to(out_dtype), x0, return_dict)
