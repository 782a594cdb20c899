"""The unCLIP (Karlo) sampler: diffusers' UnCLIPScheduler (DDPM with the cosine schedule, the step's
beta recomputed from the timesteps it skips, fixed_small_log or learned_range variance) with the step
computed by one fused guided_step call (guidance combine included)."""

from __future__ import annotations

import diffusers
import torch
from diffusers.schedulers.scheduling_unclip import UnCLIPSchedulerOutput

from diffkern.schedulers._base import FusedStep, coeff_rows

FUSED_VARIANCES = ("fixed_small_log", "learned_range")


class UnCLIPScheduler(FusedStep, diffusers.UnCLIPScheduler):
    """diffusers' UnCLIPScheduler; `step` (with the explicit `prev_timestep` the unCLIP pipelines pass)
    is one fused guided_step call and also takes `uncond_output` + `guidance_scale` (variance channels
    from the conditional output, as diffusers' unCLIP pipelines combine them) and `variance_noise`."""

    _output_cls = UnCLIPSchedulerOutput
    order = 1  # diffusers' UnCLIPScheduler has none; pipelines that read scheduler.order assume 1

    def fallback_reason(self, model_output=None, sample=None, **step_kwargs):
        vt, pt = self.config.variance_type, self.config.prediction_type
        if vt not in FUSED_VARIANCES:
            return f"variance_type={vt!r}"
        if pt not in ("epsilon", "sample"):
            return f"prediction_type={pt!r}"
        if vt == "learned_range" and model_output is not None and model_output.shape[1] == sample.shape[1]:
            return "variance_type='learned_range' without variance channels"
        return None

    def step_coefficients(self, timestep, prev_timestep=None, batch=1):
        """(B, 6), or (B, 8) for learned_range, float32 guided_step coefficients
        [sa, s1m, c_x0, c_xt, 0, sigma(, min_log, max_log)] of the step timestep -> prev_timestep."""
        t = int(timestep)
        T = self.config.num_train_timesteps
        if not 0 <= t < T:
            raise ValueError(f"UnCLIPScheduler.step: timestep must be in [0, {T}), got {t}")
        prev = t - 1 if prev_timestep is None else int(prev_timestep)
        if prev >= t:
            raise ValueError(f"UnCLIPScheduler.step: prev_timestep ({prev}) must be below timestep ({t})")
        # float32 tensor arithmetic in diffusers' order: at t = 999 of the capped cosine schedule
        # alpha = 1 - (1 - abar_t / abar_prev) keeps only a few bits, and matching diffusers means
        # keeping exactly those bits (float64 here drifts ~1e-4 from it two steps later)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.one
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if prev == t - 1:
            beta, alpha = self.betas[t], self.alphas[t]
        else:
            beta = 1 - a_t / a_prev
            alpha = 1 - beta
        var = b_prev / b_t * beta
        sigma = 0.0 if t == 0 else float(torch.exp(0.5 * torch.log(torch.clamp(var, min=1e-20))))
        row = [float(a_t ** 0.5), float(b_t ** 0.5), float(a_prev ** 0.5 * beta / b_t),
               float(alpha ** 0.5 * b_prev / b_t), 0.0, sigma]
        if self.config.variance_type == "learned_range":
            # diffusers takes log(variance) unclamped (-inf at t = 0, where no noise is added)
            row += [float(var.log()), float(beta.log())]
        return coeff_rows(batch, row)

    def step(self, model_output, timestep, sample, prev_timestep=None, generator=None, return_dict=True, *,
             uncond_output=None, guidance_scale=1.0, variance_noise=None):
        """One reverse step timestep -> prev_timestep (t - 1 when None); noise (t > 0 only) drawn as
        diffusers draws it, with the prediction's shape."""
        why = self.fallback_reason(model_output, sample)
        if why is not None:
            if variance_noise is not None:
                raise ValueError(f"UnCLIPScheduler: variance_noise is not taken with {why}")
            return self._parent_step(model_output, timestep, sample, prev_timestep, generator, return_dict,
                                     uncond_output=uncond_output, guidance_scale=guidance_scale)
        C = sample.shape[1]
        learned = self.config.variance_type == "learned_range"
        if model_output.shape[1] != (2 * C if learned else C):
            need = f"2*C={2 * C}" if learned else f"the sample's {C}"
            raise ValueError(f"UnCLIPScheduler: variance_type={self.config.variance_type!r} needs model_output "
                             f"with {need} channels, got {model_output.shape[1]}")
        t = int(timestep)
        coeffs = self.step_coefficients(t, prev_timestep, sample.shape[0])
        noise = self._noise(sample.shape, model_output, generator, variance_noise) if t > 0 else None
        prev, x0 = self._guided(sample, model_output, coeffs, uncond_output=uncond_output,
                                guidance_scale=guidance_scale, noise=noise, eps_from_clipped=True,
                                variance="learned_range" if learned else "fixed")
        return self._output(prev, x0, return_dict)
