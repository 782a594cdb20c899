"""The unCLIP (Karlo) sampler, a drop-in for diffusers' UnCLIPScheduler: DDPM with the cosine
schedule, the step's beta recomputed from the timesteps it skips, fixed_small_log or learned_range
variance. Each step is one fused guided_step call (guidance combine included)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._base import _Scheduler, coeff_rows
from diffkern.schedulers.schedules import betas_for_alpha_bar

VARIANCE_TYPES = ("fixed_small_log", "learned_range")


class UnCLIPScheduler(_Scheduler):
    """DDPM variant of Karlo / DALL-E 2 (diffusers' UnCLIPScheduler contract, argument for argument).

    Config: num_train_timesteps, variance_type ("fixed_small_log" | "learned_range"), clip_sample,
    clip_sample_range, prediction_type ("epsilon" | "sample"), beta_schedule (only
    "squaredcos_cap_v2"). set_timesteps(N) runs round(i * (T - 1) / (N - 1)) for i = N-1..0; step
    takes the explicit `prev_timestep` the unCLIP pipelines pass (beta = 1 - abar_t / abar_prev then).

    `step` also takes `uncond_output` + `guidance_scale` (classifier-free guidance fused into the same
    op, variance channels from the conditional output, as diffusers' unCLIP pipelines combine them)
    and `variance_noise` (instead of drawing from `generator`).
    """

    _defaults: ClassVar[dict] = {
        "num_train_timesteps": 1000,
        "variance_type": "fixed_small_log",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
    }
    _prediction_types = ("epsilon", "sample")
    _beta_schedules = ("squaredcos_cap_v2",)
    _compatibles = ()  # diffusers lists none for UnCLIPScheduler

    def _validate(self, cfg):
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            raise ValueError(
                "UnCLIPScheduler: beta_schedule must be 'squaredcos_cap_v2' (the only one it supports), "
                f"got {cfg['beta_schedule']!r}"
            )
        super()._validate(cfg)
        if cfg["variance_type"] not in VARIANCE_TYPES:
            raise ValueError(
                f"UnCLIPScheduler: variance_type must be one of {VARIANCE_TYPES}, got {cfg['variance_type']!r}"
            )

    def _build_schedule(self, cfg):
        self.betas = betas_for_alpha_bar(cfg["num_train_timesteps"])
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)

    def _post_init(self):
        self.variance_type = self.config.variance_type
        self.timesteps = torch.from_numpy(np.arange(0, self.config.num_train_timesteps)[::-1].copy())

    def set_timesteps(self, num_inference_steps, device=None):
        """Karlo's spacing: round(i * (T - 1) / (N - 1)), i = N-1 .. 0 (first T - 1, last 0)."""
        n, T = num_inference_steps, self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(
                f"UnCLIPScheduler.set_timesteps: num_inference_steps must be an int >= 2 (the spacing "
                f"divides by N - 1), got {n!r}"
            )
        if n > T:
            raise ValueError(
                f"UnCLIPScheduler.set_timesteps: num_inference_steps={n} exceeds num_train_timesteps={T}"
            )
        self.num_inference_steps = n
        ratio = (T - 1) / (n - 1)
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
        self.timesteps = torch.from_numpy(ts).to(device)

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
        if self.variance_type == "learned_range":
            # diffusers takes log(variance) unclamped (-inf at t = 0, where no noise is added)
            row += [float(var.log()), float(beta.log())]
        return coeff_rows(batch, row)

    def step(
        self,
        model_output,
        timestep,
        sample,
        prev_timestep=None,
        generator=None,
        return_dict=True,
        *,
        uncond_output=None,
        guidance_scale=1.0,
        variance_noise=None,
    ):
        """One reverse step timestep -> prev_timestep (t - 1 when None); noise (t > 0 only) drawn as
        diffusers draws it, with model_output's prediction shape. Returns UnCLIP's (prev_sample,
        pred_original_sample)."""
        C = sample.shape[1]
        learned = self.variance_type == "learned_range"
        if learned and model_output.shape[1] != 2 * C:
            raise ValueError(
                f"UnCLIPScheduler: variance_type='learned_range' needs model_output with 2*C={2 * C} "
                f"channels (prediction, variance), got {model_output.shape[1]}"
            )
        if not learned and model_output.shape[1] != C:
            raise ValueError(
                f"UnCLIPScheduler: model_output must have the sample's {C} channels for variance_type="
                f"'fixed_small_log', got {model_output.shape[1]}"
            )
        t = int(timestep)
        coeffs = self.step_coefficients(t, prev_timestep, sample.shape[0])
        return self._ancestral_step(sample, model_output, coeffs, t, uncond_output=uncond_output,
                                    guidance_scale=guidance_scale, generator=generator,
                                    variance_noise=variance_noise, return_dict=return_dict, learned=learned)
