"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095, Algorithms 1-2; the SDE variant of
sec. 4.3): diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" or
"sde-dpmsolver++", orders 1-3, each step one fused sampler_update call: the x0 conversion,
thresholding, and the combination with the kept x0 of the last steps in one pass."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffkern.schedulers._base import FusedStep, threshold_fallback, alpha_sigma, log_snr, randn_like_diffusers


def x0_row(prediction_type, sigma):
    """(cx, cp) of the VP data prediction x0 = cx x + cp pred at this sigma."""
    a, s = alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return 1.0 / a, -s / a
    if prediction_type == "v_prediction":
        return a, -s
    return 0.0, 1.0


def prediction_channels(config, model_output, uncond_output):
    """diffusers keeps the first 3 channels of a learned-variance epsilon output."""
    if config.get("variance_type") in ("learned", "learned_range") and config.prediction_type == "epsilon":
        model_output = model_output[:, :3]
        uncond_output = None if uncond_output is None else uncond_output[:, :3]
    return model_output, uncond_output


class DPMSolverMultistepScheduler(FusedStep, diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler (timesteps, Karras / exponential / beta / Lu sigmas, config
    are the parent's); `step` is one fused sampler_update call for algorithm_type "dpmsolver++" and
    "sde-dpmsolver++" with VP sigmas, and also takes `uncond_output` + `guidance_scale`. The
    noise-prediction algorithms ("dpmsolver", "sde-dpmsolver") and flow sigmas run diffusers' step."""

    _output_cls = SchedulerOutput
    _output_has_x0 = False

    def fallback_reason(self, **step_kwargs):
        cfg = self.config
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            return f"algorithm_type={cfg.algorithm_type!r}"
        if cfg.use_flow_sigmas:
            return "use_flow_sigmas=True"
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
            return f"prediction_type={cfg.prediction_type!r}"
        return threshold_fallback(cfg)

    def _order_of_step(self):
        cfg = self.config
        n = len(self.timesteps)
        last = self.step_index == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        second_last = self.step_index == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or last:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or second_last:
            return 2
        return 3

    @np.errstate(divide="ignore", invalid="ignore")
    def step_coefficients(self, order):
        """([a, b_m0, b_m1, b_m2], std): out = a x + b_m0 x0 + b_m1 m1 + b_m2 m2 + std noise, where x0 is
        this step's data prediction and m1, m2 those of the one and two steps before."""
        i = self.step_index
        s = [self._sigma(i + 1)] + [self._sigma(i - k) for k in range(order)]
        (alpha_t, sigma_t), (_, sigma_s0) = alpha_sigma(s[0]), alpha_sigma(s[1])
        lam = [np.float64(log_snr(v)) for v in s]  # numpy floats: h = 0 gives inf / nan as in diffusers
        h = lam[0] - lam[1]
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        e_h = math.exp(-h)
        if sde:
            e_2h = math.exp(-2.0 * h)
            a = sigma_t / sigma_s0 * e_h
            b0 = alpha_t * (1 - e_2h)
            std = sigma_t * math.sqrt(max(1.0 - e_2h, 0.0))
        else:
            a = sigma_t / sigma_s0
            b0 = -alpha_t * (e_h - 1.0)
            std = 0.0
        coef = np.array([b0, 0.0, 0.0])  # over (m0, m1, m2)
        if order >= 2:
            r0 = (lam[1] - lam[2]) / h
            D1_0 = np.array([1.0, -1.0, 0.0]) / r0
            if order == 2:
                heun = self.config.solver_type == "heun"
                if sde:
                    b1 = alpha_t * ((1 - e_2h) / (-2.0 * h) + 1.0) if heun else 0.5 * alpha_t * (1 - e_2h)
                else:
                    b1 = alpha_t * ((e_h - 1.0) / h + 1.0) if heun else -0.5 * alpha_t * (e_h - 1.0)
                coef = coef + b1 * D1_0
            else:
                r1 = (lam[2] - lam[3]) / h
                D1_1 = np.array([0.0, 1.0, -1.0]) / r1
                D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
                if sde:
                    b1 = alpha_t * ((1.0 - e_2h) / (-2.0 * h) + 1.0)
                    b2 = alpha_t * ((1.0 - e_2h - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
                else:
                    b1 = alpha_t * ((e_h - 1.0) / h + 1.0)
                    b2 = -alpha_t * ((e_h - 1.0 + h) / h**2 - 0.5)
                coef = coef + b1 * D1 + b2 * D2
        return [a, *coef.tolist()], std

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True, *,
             uncond_output=None, guidance_scale=1.0):
        """One multistep update; returns (prev_sample,) like diffusers."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, generator, variance_noise, return_dict,
                                     uncond_output=uncond_output, guidance_scale=guidance_scale)
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        order = self._order_of_step()
        model_output, uncond_output = prediction_channels(self.config, model_output, uncond_output)
        out_dtype = model_output.dtype
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            if variance_noise is None:
                noise = randn_like_diffusers(model_output.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        x = sample.to(torch.float32)
        if model_output.dtype != torch.float32:
            model_output = model_output.to(torch.float32)
            uncond_output = None if uncond_output is None else uncond_output.to(torch.float32)
        (a, b0, b1, b2), std = self.step_coefficients(order)
        cx, cp = x0_row(self.config.prediction_type, self._sigma(self.step_index))
        # before the shift, model_outputs[-1] / [-2] hold the x0 of the one / two previous steps (m1, m2)
        history = [self.model_outputs[-1], self.model_outputs[-2]][: order - 1] if order > 1 else []
        row = [cx, cp, a, b0, *[b1, b2][: len(history)], std]
        prev, x0 = self._fused(x, model_output, row, history, uncond_output=uncond_output,
                               guidance_scale=guidance_scale, noise=noise,
                               clip="dynamic" if self.config.thresholding else "none")
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = prev.to(out_dtype)
        return self._output(prev, None, return_dict)
