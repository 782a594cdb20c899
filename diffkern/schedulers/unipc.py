"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the UniC corrector then the UniP predictor (B(h) = h
or e^h - 1): diffusers' UniPCMultistepScheduler with a step as ONE fused sampler_update call (both
are linear in the kept data predictions, the last sample and this step's prediction), writing the
next sample and (as its second combination) the corrected sample kept for the next step."""

from __future__ import annotations

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffkern.schedulers._base import FusedStep, threshold_fallback, alpha_sigma
from diffkern.schedulers.dpmsolver import prediction_channels, x0_row


class UniPCMultistepScheduler(FusedStep, diffusers.UniPCMultistepScheduler):
    """diffusers' UniPCMultistepScheduler (timesteps, sigmas, config are the parent's); `step` (UniC +
    UniP, bh1 / bh2, predict_x0 or not, thresholding, disable_corrector) is one fused sampler_update
    call, returns (prev_sample,) and also takes `uncond_output` + `guidance_scale`. An external
    `solver_p` and flow sigmas run diffusers' step."""

    _output_cls = SchedulerOutput
    _output_has_x0 = False

    def fallback_reason(self, **step_kwargs):
        cfg = self.config
        if self.solver_p is not None:
            return "solver_p"
        if cfg.use_flow_sigmas:
            return "use_flow_sigmas=True"
        if cfg.prediction_type not in ("epsilon", "sample", "v_prediction"):
            return f"prediction_type={cfg.prediction_type!r}"
        return threshold_fallback(cfg)

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
            return x0_row(self.config.prediction_type, sigma)
        a, s = alpha_sigma(sigma)
        p = self.config.prediction_type
        if p == "epsilon":
            return 0.0, 1.0
        if p == "sample":
            return 1.0 / s, -a / s
        return s, a  # v_prediction: eps = alpha v + sigma x

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """Corrector (from the second step) + predictor in one fused pass; returns (prev_sample,)."""
        if self.fallback_reason() is not None:
            return self._parent_step(model_output, timestep, sample, return_dict, uncond_output=uncond_output,
                                     guidance_scale=guidance_scale)
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
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
        model_output, uncond_output = prediction_channels(cfg, model_output, uncond_output)
        res = self._fused(sample, model_output, row, history, uncond_output=uncond_output,
                          guidance_scale=guidance_scale, aux=use_corrector,
                          clip="dynamic" if self.predict_x0 and cfg.thresholding else "none")
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
        return self._output(prev, None, return_dict)
