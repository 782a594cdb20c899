"""Linear multistep sampler (k-diffusion's sample_lms: Adams-Bashforth in sigma with exactly
integrated Lagrange weights): diffusers' LMSDiscreteScheduler with each step one fused
sampler_update call (the combination with the kept derivatives, and this step's derivative as the
op's second output)."""

from __future__ import annotations

import warnings

import numpy as np
from diffusers.schedulers import scheduling_lms_discrete
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from diffkern.schedulers._base import FusedStep
from diffkern.schedulers.euler import x0_coeffs


# the module's class, not diffusers.LMSDiscreteScheduler: without scipy that name is a placeholder that raises
class LMSDiscreteScheduler(FusedStep, scheduling_lms_discrete.LMSDiscreteScheduler):
    """diffusers' LMSDiscreteScheduler; `step` is one fused sampler_update call and also takes
    `uncond_output` + `guidance_scale`. `get_lms_coefficient` integrates the Lagrange weights by
    Gauss-Legendre quadrature (exact for these polynomials) where diffusers calls scipy's quad, so
    it works without scipy; the two agree to float32 rounding."""

    _output_cls = LMSDiscreteSchedulerOutput

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return None if pt in ("epsilon", "v_prediction", "sample") else f"prediction_type={pt!r}"

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

    def step(self, model_output, timestep, sample, order=4, return_dict=True, *, uncond_output=None,
             guidance_scale=1.0):
        """One LMS step of the given order (lower while history builds up)."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, order, return_dict,
                                     uncond_output=uncond_output, guidance_scale=guidance_scale)
        if not self.is_scale_input_called:
            warnings.warn(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example.", stacklevel=2)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        sigma = self._sigma(i)
        cx, cp = x0_coeffs(self.config.prediction_type, sigma)
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
