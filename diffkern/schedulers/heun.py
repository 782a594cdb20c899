"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn): diffusers'
HeunDiscreteScheduler with each of a step's two stages one fused sampler_update call; the first also
writes its derivative (x - x0) / sigma as the op's second output, for the second stage."""

from __future__ import annotations

import diffusers
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

from diffkern.schedulers._base import FusedStep
from diffkern.schedulers.euler import x0_coeffs


class HeunDiscreteScheduler(FusedStep, diffusers.HeunDiscreteScheduler):
    """diffusers' HeunDiscreteScheduler (order 2: every inner timestep appears twice); each stage is one
    fused sampler_update call, and `step` also takes `uncond_output` + `guidance_scale`."""

    _output_cls = HeunDiscreteSchedulerOutput

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return None if pt in ("epsilon", "v_prediction", "sample") else f"prediction_type={pt!r}"

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One Heun stage; returns (prev_sample, pred_original_sample)."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, return_dict, uncond_output=uncond_output,
                                     guidance_scale=guidance_scale)
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        first = self.state_in_first_order
        sigma = self._sigma(i if first else i - 1)
        sigma_next = self._sigma(i + 1 if first else i)
        cx, cp = x0_coeffs(self.config.prediction_type, sigma if first else sigma_next)
        clip = "static" if self.config.clip_sample else "none"
        kw = dict(uncond_output=uncond_output, guidance_scale=guidance_scale, clip=clip,
                  clip_range=self.config.clip_sample_range)
        if first:
            dt = sigma_next - sigma
            # prev = x + dt (x - x0) / sigma; aux = the derivative (x - x0) / sigma
            prev, x0, deriv = self._fused(sample, model_output, [cx, cp, 1 + dt / sigma, -dt / sigma, 0.0,
                                                                 1 / sigma, -1 / sigma], aux=True, **kw)
            self.prev_derivative, self.dt, self.sample = deriv, dt, sample
        else:
            dt = self.dt
            # prev = sample_0 + dt (d_0 + (x - x0) / sigma_next) / 2
            k = dt / (2 * sigma_next)
            prev, x0 = self._fused(sample, model_output, [cx, cp, k, -k, 1.0, dt / 2, 0.0],
                                   [self.sample, self.prev_derivative], **kw)
            self.prev_derivative, self.dt, self.sample = None, None, None
        self._step_index += 1
        return self._output(prev, x0, return_dict)
