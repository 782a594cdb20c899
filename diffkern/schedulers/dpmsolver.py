"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095, Algorithms 1-2; the SDE variant of
sec. 4.3), a drop-in for diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++"
or "sde-dpmsolver++", orders 1-3. Each step is one fused sampler_update call: the x0 conversion,
thresholding, and the combination with the kept x0 of the last steps in one pass."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._multistep import _VPMultistep, alpha_sigma, log_snr, vp_timesteps
from diffkern.schedulers._sigmas import convert_sigmas


class DPMSolverMultistepScheduler(_VPMultistep):
    """DPM-Solver++ (2M, 3M, SDE) with diffusers' DPMSolverMultistepScheduler config and contract.

    Supported: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1-3, solver_type
    "midpoint" / "heun", prediction epsilon / sample / v_prediction, thresholding, lower_order_final,
    euler_at_final, use_karras_sigmas, use_exponential_sigmas, final_sigmas_type, lambda_min_clipped,
    variance_type, custom `timesteps`. Not supported (NotImplementedError naming the key): the
    deprecated noise-prediction algorithms "dpmsolver" / "sde-dpmsolver", use_lu_lambdas,
    use_beta_sigmas, flow sigmas, dynamic shifting. `step` also takes `uncond_output` +
    `guidance_scale` (classifier-free guidance fused into the op).
    """

    _defaults: ClassVar[dict] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    _unsupported: ClassVar[dict] = {
        "algorithm_type": (("dpmsolver++", "sde-dpmsolver++"), "the deprecated noise-prediction variants"),
        "use_lu_lambdas": (False, "not implemented"),
        "use_beta_sigmas": (False, "needs scipy's beta distribution"),
        "use_flow_sigmas": (False, "flow-matching sigmas are not implemented"),
        "use_dynamic_shifting": (False, "flow-matching shifts are not implemented"),
    }

    def _validate(self, cfg):
        if cfg.get("solver_type") in ("logrho", "bh1", "bh2"):
            cfg["solver_type"] = "midpoint"  # as diffusers' __init__ maps UniPC/DEIS solver types
        if cfg.get("algorithm_type") == "deis":
            cfg["algorithm_type"] = "dpmsolver++"
        super()._validate(cfg)
        name = "DPMSolverMultistepScheduler"
        if cfg["solver_order"] not in (1, 2, 3):
            raise ValueError(f"{name}: solver_order must be 1, 2 or 3, got {cfg['solver_order']!r}")
        if cfg["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"{name}: solver_type must be 'midpoint' or 'heun', got {cfg['solver_type']!r}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', got "
                             f"{cfg['final_sigmas_type']!r}")
        if cfg["variance_type"] not in (None, "learned", "learned_range"):
            raise ValueError(f"{name}: variance_type must be None, 'learned' or 'learned_range', got "
                             f"{cfg['variance_type']!r}")

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        """Inference timesteps (int64) and sigmas: spacing (+ Karras / exponential sigmas) or custom
        descending `timesteps`."""
        cfg = self.config
        if mu is not None:
            raise NotImplementedError("DPMSolverMultistepScheduler: mu (dynamic shifting) is not supported")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas` / `use_exponential_sigmas`")
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                    or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last = (cfg.num_train_timesteps - clipped).numpy().item()
            timesteps = vp_timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                     cfg.steps_offset, last)
        acp = self.alphas_cumprod
        sigmas = np.array(((1 - acp) / acp) ** 0.5)
        log_sigmas = np.log(sigmas)
        conv = convert_sigmas(cfg, np.flip(sigmas).copy(), num_inference_steps or len(timesteps), log_sigmas)
        if conv is not None:
            sigmas, timesteps = conv
            if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._reset_index()

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
        self._require_timesteps()
        if self.step_index is None:
            self._init_step_index(timestep)
        order = self._order_of_step()
        model_output, uncond_output = self._prepare_output(model_output, uncond_output)
        out_dtype = model_output.dtype
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            if variance_noise is None:
                from diffkern.schedulers._base import randn_like_diffusers

                noise = randn_like_diffusers(model_output.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        x = sample.to(torch.float32)
        if model_output.dtype != torch.float32:
            model_output = model_output.to(torch.float32)
            uncond_output = None if uncond_output is None else uncond_output.to(torch.float32)
        (a, b0, b1, b2), std = self.step_coefficients(order)
        cx, cp = self._x0_row(self._sigma(self.step_index))
        # before the shift, model_outputs[-1] / [-2] hold the x0 of the one / two previous steps (m1, m2)
        history = [self.model_outputs[-1], self.model_outputs[-2]][: order - 1] if order > 1 else []
        row = [cx, cp, a, b0, *[b1, b2][: len(history)], std]
        prev, x0 = self._fused(x, model_output, row, history, uncond_output=uncond_output,
                               guidance_scale=guidance_scale, noise=noise, clip=self._clip())
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev = prev.to(out_dtype)
        return (prev,) if not return_dict else self._output(prev, None, True)
