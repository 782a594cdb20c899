"""Linear multistep sampler (k-diffusion's sample_lms: Adams-Bashforth in sigma with exactly
integrated Lagrange weights), a drop-in for diffusers' LMSDiscreteScheduler. Each step is one fused
sampler_update call: the combination with the kept derivatives, and this step's derivative as the
op's second output."""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._sigmas import _KarrasSigmaScheduler, spaced_timesteps


class LMSDiscreteScheduler(_KarrasSigmaScheduler):
    """LMS sampler with diffusers' LMSDiscreteScheduler config and step contract (`order` per step,
    default 4). The Lagrange weights are integrated exactly (Gauss-Legendre, exact for these
    polynomials) where diffusers calls scipy's quad; the two agree to its float32 inputs.
    `step` also takes `uncond_output` + `guidance_scale`."""

    _rejects_int_timesteps = False
    _defaults: ClassVar[dict] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _unsupported: ClassVar[dict] = {"use_beta_sigmas": (False, "needs scipy's beta distribution")}

    def _post_init(self):
        super()._post_init()
        self.set_timesteps(self.config.num_train_timesteps, None)
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps, device=None):
        """Spaced timesteps and their (optionally Karras / exponential) sigmas, then 0."""
        cfg = self.config
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
        self.num_inference_steps = n
        ts = spaced_timesteps(cfg.num_train_timesteps, n, cfg.timestep_spacing, cfg.steps_offset)
        sigmas, ts = self._sigmas_for(ts, n)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.float32)
        self._reset_index()
        self.derivatives = []

    def get_lms_coefficient(self, order, t, current_order):
        """Integral over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of point current_order."""
        s = self.sigmas.tolist()
        nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))  # exact for degree < 2 order
        lo, hi = s[t], s[t + 1]
        tau = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
        prod = np.ones_like(tau)
        for k in range(order):
            if k != current_order:
                prod *= (tau - s[t - k]) / (s[t - current_order] - s[t - k])
        return float(0.5 * (hi - lo) * np.sum(weights * prod))

    def _warn_unscaled(self):
        if not self.is_scale_input_called:
            warnings.warn(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example.", stacklevel=3)

    def step(self, model_output, timestep, sample, order=4, return_dict=True, *, uncond_output=None,
             guidance_scale=1.0):
        """One LMS step of the given order (lower while history builds up)."""
        self._warn_unscaled()
        self._check_timestep(timestep)
        i = self.step_index
        sigma = self._sigma(i)
        cx, cp = self._x0_coeffs(sigma)
        kept = self.derivatives[-(order - 1):] if order > 1 else []
        n = min(i + 1, order)
        coeffs = [self.get_lms_coefficient(n, i, k) for k in range(n)]  # k = 0: this step's derivative
        history = kept[::-1][: n - 1]  # newest first, matching coeffs[1:]
        H = len(history)
        c0 = coeffs[0]
        row = [cx, cp, 1 + c0 / sigma, -c0 / sigma, *coeffs[1 : 1 + H], 0.0, 1 / sigma, -1 / sigma, *([0.0] * H)]
        prev, x0, deriv = self._fused(sample, model_output, row, history, uncond_output=uncond_output,
                                      guidance_scale=guidance_scale, aux=True)
        self.derivatives.append(deriv)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        self._step_index += 1
        return self._output(prev, x0, return_dict)
