"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the UniC corrector then the UniP predictor (B(h) = h
or e^h - 1), a drop-in for diffusers' UniPCMultistepScheduler. Both are linear in the kept data
predictions, the last sample and this step's prediction, so a step is ONE fused sampler_update call
writing the next sample and (as its second combination) the corrected sample kept for the next step."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._multistep import _VPMultistep, alpha_sigma, vp_timesteps
from diffkern.schedulers._sigmas import convert_sigmas, sigma_to_t


class UniPCMultistepScheduler(_VPMultistep):
    """UniPC with diffusers' UniPCMultistepScheduler config and step contract (orders 1-3 tested;
    bh1 / bh2; predict_x0; thresholding; Karras / exponential sigmas; disable_corrector;
    lower_order_final). Not supported (NotImplementedError): solver_p, flow sigmas, dynamic
    shifting, use_beta_sigmas. `step` returns (prev_sample,) and also takes `uncond_output` +
    `guidance_scale` (classifier-free guidance fused into the op)."""

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
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }
    _unsupported: ClassVar[dict] = {
        "solver_p": (None, "an external predictor scheduler is not supported"),
        "use_beta_sigmas": (False, "needs scipy's beta distribution"),
        "use_flow_sigmas": (False, "flow-matching sigmas are not implemented"),
        "use_dynamic_shifting": (False, "flow-matching shifts are not implemented"),
    }

    def _validate(self, cfg):
        if cfg.get("solver_type") in ("midpoint", "heun", "logrho"):
            cfg["solver_type"] = "bh2"  # as diffusers' __init__ maps DPM-Solver's solver types
        super()._validate(cfg)
        if cfg["solver_type"] not in ("bh1", "bh2"):
            raise ValueError(f"UniPCMultistepScheduler: solver_type must be 'bh1' or 'bh2', got {cfg['solver_type']!r}")
        if isinstance(cfg["solver_order"], bool) or not isinstance(cfg["solver_order"], int) or cfg["solver_order"] < 1:
            raise ValueError(f"UniPCMultistepScheduler: solver_order must be a positive int, got {cfg['solver_order']!r}")
        if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"UniPCMultistepScheduler: final_sigmas_type must be 'zero' or 'sigma_min', got "
                             f"{cfg['final_sigmas_type']!r}")
        if cfg.get("shift_terminal") is not None:
            raise ValueError("`shift_terminal` is only supported when `use_flow_sigmas=True`.")

    def _post_init(self):
        super()._post_init()
        self.predict_x0 = self.config.predict_x0
        self.disable_corrector = list(self.config.disable_corrector)
        self.solver_p = None
        self.timestep_list = [None] * self.config.solver_order
        self.last_sample = None
        self.this_order = None

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        """Inference timesteps (int64) and sigmas per spacing (+ Karras / exponential sigmas)."""
        cfg = self.config
        if sigmas is not None or mu is not None:
            raise NotImplementedError("UniPCMultistepScheduler: sigmas= / mu= need flow sigmas, not supported")
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
        timesteps = vp_timesteps(cfg.num_train_timesteps, n, cfg.timestep_spacing, cfg.steps_offset)
        acp = self.alphas_cumprod
        train = np.array(((1 - acp) / acp) ** 0.5)
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            log_sigmas = np.log(train)
            sig, _ = convert_sigmas(cfg, np.flip(train).copy(), n, log_sigmas)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sig])
            if cfg.use_karras_sigmas:
                timesteps = timesteps.round()
            last = sig[-1] if cfg.final_sigmas_type == "sigma_min" else 0
        else:
            sig = np.interp(timesteps, np.arange(0, len(train)), train)
            last = self._final_sigma()
        self.sigmas = torch.from_numpy(np.concatenate([sig, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.timestep_list = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        self._reset_index()

    # -- coefficients ---------------------------------------------------------------------------
    # The scalars (log-SNR steps, r_k, the B(h) system and its solution) are computed in float32
    # torch arithmetic in diffusers' order: the order-3 system amplifies float32 rounding to ~2e-5
    # of the sample, so float64 here would be more exact but not diffusers' trajectory. They are
    # then folded into one coefficient per tensor in float64.
    def _lam(self, i):
        sigma = self.sigmas[i]
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha, torch.log(alpha) - torch.log(sigma * alpha)

    def _system(self, i_t, i_s0, points, order):
        """(ratio, scale, h_phi_1, B_h, rks, b) of the step s0 -> t with the earlier points si."""
        a_t, s_t, l_t = self._lam(i_t)
        a_s0, s_s0, l_s0 = self._lam(i_s0)
        h = l_t - l_s0
        rks = [(self._lam(si)[2] - l_s0) / h for si in points] + [torch.ones(())]
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        b, fact = [], 1
        for i in range(1, order + 1):
            b.append(h_phi_k * fact / B_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        ratio, scale = (s_t / s_s0, a_t) if self.predict_x0 else (a_t / a_s0, s_t)
        return float(ratio), float(scale), float(h_phi_1), float(B_h), torch.stack(rks), torch.stack(b)

    def _corrector(self, order):
        """Coefficients of the corrected sample over (last_sample, m0, m1.., this step's prediction)."""
        i = self.step_index
        ratio, scale, h_phi_1, B_h, rks, b = self._system(i, i - 1, [i - (k + 1) for k in range(1, order)], order)
        if order == 1:
            rhos = [0.5]
        else:
            R = torch.stack([torch.pow(rks, j - 1) for j in range(1, order + 1)])
            rhos = torch.linalg.solve(R, b).tolist()
        rks = rks.tolist()
        m = [0.0] * order  # over (m0, m1, ..., m_{order-1}) of the kept predictions
        m[0] = -scale * h_phi_1
        for k in range(1, order):  # D1_k = (m_k - m0) / r_k
            c = -scale * B_h * rhos[k - 1] / rks[k - 1]
            m[k] += c
            m[0] -= c
        c_t = -scale * B_h * rhos[-1]  # D1_t = model_t - m0
        m[0] -= c_t
        return ratio, m, c_t

    def _predictor(self, order):
        """Coefficients of the next sample over (corrected sample, this prediction m0, m1, ...)."""
        i = self.step_index
        ratio, scale, h_phi_1, B_h, rks, b = self._system(i + 1, i, [i - k for k in range(1, order)], order)
        m = [0.0] * order
        m[0] = -scale * h_phi_1
        if order >= 2:
            if order == 2:
                rhos = [0.5]
            else:
                R = torch.stack([torch.pow(rks, j - 1) for j in range(1, order + 1)])
                rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            rks = rks.tolist()
            for k in range(1, order):
                c = -scale * B_h * rhos[k - 1] / rks[k - 1]
                m[k] += c
                m[0] -= c
        return ratio, m

    def _x0_or_eps_row(self, sigma):
        if self.predict_x0:
            return self._x0_row(sigma)
        a, s = alpha_sigma(sigma)
        p = self.config.prediction_type
        if p == "epsilon":
            return 0.0, 1.0
        if p == "sample":
            return 1.0 / s, -a / s
        return s, a  # v_prediction: eps = alpha v + sigma x

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """Corrector (from the second step) + predictor in one fused pass; returns (prev_sample,)."""
        self._require_timesteps()
        if self.step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        i = self.step_index
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        prev_preds = [m for m in self.model_outputs[::-1] if m is not None]  # m0, m1, ... before this step
        if cfg.lower_order_final:
            this_order = min(cfg.solver_order, len(self.timesteps) - i)
        else:
            this_order = cfg.solver_order
        this_order = min(this_order, self.lower_order_nums + 1)
        # basis of the fused combination: x (this sample), d (this prediction), then the history
        history, hist_idx = [], {}

        def slot(key, tensor):
            if key not in hist_idx:
                hist_idx[key] = len(history)
                history.append(tensor)
            return hist_idx[key]

        corr = {"x": 0.0, "d": 0.0}  # corrected sample's coefficients (over "x", "d" and history slots)
        if use_corrector:
            ratio_c, m_c, c_t = self._corrector(self.this_order)
            corr[slot("last", self.last_sample)] = ratio_c
            for k, c in enumerate(m_c):
                j = slot(("m", k), prev_preds[k])
                corr[j] = corr.get(j, 0.0) + c
            corr["d"] += c_t
        else:
            corr["x"] = 1.0
        ratio_p, m_p = self._predictor(this_order)
        out = {key: ratio_p * v for key, v in corr.items()}
        out["d"] = out.get("d", 0.0) + m_p[0]
        for k in range(1, this_order):  # the predictor's m_k is the prediction of k steps before
            j = slot(("m", k - 1), prev_preds[k - 1])
            out[j] = out.get(j, 0.0) + m_p[k]
        H = len(history)
        cx, cp = self._x0_or_eps_row(self._sigma(i))
        row = [cx, cp, out["x"], out["d"], *[out.get(j, 0.0) for j in range(H)], 0.0]
        if use_corrector:
            row += [corr["x"], corr["d"], *[corr.get(j, 0.0) for j in range(H)]]
        model_output, uncond_output = self._prepare_output(model_output, uncond_output)
        res = self._fused(sample, model_output, row, history, uncond_output=uncond_output,
                          guidance_scale=guidance_scale, aux=use_corrector,
                          clip=self._clip() if self.predict_x0 else "none")
        prev, d = res[0], res[1]
        for k in range(cfg.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1] = d
        self.timestep_list[-1] = timestep
        self.this_order = this_order
        self.last_sample = res[2] if use_corrector else sample
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return (prev,) if not return_dict else self._output(prev, None, True)
