"""Pseudo numerical methods (PNDM, Liu et al. 2022, arXiv:2202.09778): Runge-Kutta warm-up (PRK) then
linear multistep (PLMS, eq. 12): diffusers' PNDMScheduler (Stable Diffusion 1.x's default, with
skip_prk_steps) with each step one fused sampler_update call: the guidance combine, the
Adams-Bashforth combination of the kept epsilons and the DDIM-style transfer in one pass."""

from __future__ import annotations

import math

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffkern.schedulers._base import FusedStep, guide

# Adams-Bashforth weights of eps_t, eps_{t-1}, ... by the number of kept epsilons
_PLMS = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


class PNDMScheduler(FusedStep, diffusers.PNDMScheduler):
    """diffusers' PNDMScheduler (PRK warm-up and skip_prk_steps); each step is one fused sampler_update
    call, returns (prev_sample,) and also takes `uncond_output` + `guidance_scale`."""

    _output_cls = SchedulerOutput
    _output_has_x0 = False

    def fallback_reason(self, **step_kwargs):
        pt = self.config.prediction_type
        return None if pt in ("epsilon", "v_prediction") else f"prediction_type={pt!r}"

    def _transfer(self, t, prev_t):
        """(sample coefficient, eps coefficient, v scale sa, v shift s1m) of diffusers' _get_prev_sample:
        prev = c_s S - c_e e', e' = eps (or sa v + s1m S for v_prediction)."""
        if getattr(self, "_acp_src", None) is not self.alphas_cumprod:  # python floats, cached per table
            self._acp_list, self._acp_src = self.alphas_cumprod.tolist(), self.alphas_cumprod
        a_t = self._acp_list[t]
        a_prev = self._acp_list[prev_t] if prev_t >= 0 else float(self.final_alpha_cumprod)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        c_s = math.sqrt(a_prev / a_t)
        denom = a_t * math.sqrt(b_prev) + math.sqrt(a_t * b_t * a_prev)
        return c_s, (a_prev - a_t) / denom, math.sqrt(a_t), math.sqrt(b_t)

    def _combine(self, model_output, uncond_output, guidance_scale, t, prev_t, on_x, on_hist, eps_x, eps_hist,
                 sample, history, aux=None):
        """One fused pass: prev = c_s S - c_e e', with S = on_x x + on_hist . history and
        e' = eps_x pred + eps_hist . history (+ the v conversion); aux = (a2, b2, d) or None."""
        c_s, c_e, sa, s1m = self._transfer(t, prev_t)
        if self.config.prediction_type == "v_prediction":  # e'' = sa e' + s1m S
            c_s_eff = c_s - c_e * s1m
            c_e_eff = c_e * sa
        else:
            c_s_eff, c_e_eff = c_s, c_e
        a = c_s_eff * on_x
        b = -c_e_eff * eps_x
        hist = [c_s_eff * oh - c_e_eff * eh for oh, eh in zip(on_hist, eps_hist)]
        row = [0.0, 1.0, a, b, *hist, 0.0]
        if aux is not None:
            row += [aux[0], aux[1], *aux[2]]
        return self._fused(sample, model_output, row, history, uncond_output=uncond_output,
                           guidance_scale=guidance_scale, aux=aux is not None)

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One PRK or PLMS step (by the step counter, as diffusers); returns (prev_sample,)."""
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict, uncond_output=uncond_output,
                                 guidance_scale=guidance_scale)
        return self.step_plms(model_output, timestep, sample, return_dict, uncond_output=uncond_output,
                              guidance_scale=guidance_scale)

    def step_prk(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One Runge-Kutta warm-up step (diffusers' step_prk), fused."""
        if self.fallback_reason() is not None:
            return self._parent_call("step_prk", model_output, timestep, sample, return_dict, uncond_output,
                                     guidance_scale)
        self._require_timesteps()
        prev = self._step_prk(model_output, int(timestep), sample, uncond_output, guidance_scale)
        self.counter += 1
        return self._output(prev, None, return_dict)

    def step_plms(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None,
                  guidance_scale=1.0):
        """One linear multistep step (diffusers' step_plms), fused."""
        if self.fallback_reason() is not None:
            return self._parent_call("step_plms", model_output, timestep, sample, return_dict, uncond_output,
                                     guidance_scale)
        self._require_timesteps()
        prev = self._step_plms(model_output, int(timestep), sample, uncond_output, guidance_scale)
        self.counter += 1
        return self._output(prev, None, return_dict)

    def _parent_call(self, name, model_output, timestep, sample, return_dict, uncond_output, guidance_scale):
        if uncond_output is not None:
            model_output = guide(model_output, uncond_output, guidance_scale, sample.shape[1])
        return getattr(diffusers.PNDMScheduler, name)(self, model_output, timestep, sample, return_dict)

    def _step_prk(self, model_output, timestep, sample, uncond_output, guidance_scale):
        # RK4 over a step: eps weights 1/6, 1/3, 1/3, 1/6 accumulated in cur_model_output (an aux output)
        T, n = self.config.num_train_timesteps, self.num_inference_steps
        diff = 0 if self.counter % 2 else T // n // 2
        prev_t = timestep - diff
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        acc = self.cur_model_output if isinstance(self.cur_model_output, torch.Tensor) else None
        cur_sample = self.cur_sample if (self.cur_sample is not None and phase != 0) else sample
        history, on_hist, eps_hist = [], [], []
        acc_hist = []
        on_x = 1.0
        if cur_sample is not sample:
            history.append(cur_sample)
            on_hist.append(1.0)
            eps_hist.append(0.0)
            acc_hist.append(0.0)
            on_x = 0.0
        if acc is not None:
            history.append(acc)
            on_hist.append(0.0)
            acc_hist.append(1.0)
            eps_hist.append(1.0 if phase == 3 else 0.0)
        if phase == 3:  # the step uses acc + eps / 6 and resets the accumulator
            eps_x, aux = 1 / 6, None
        else:
            eps_x, aux = 1.0, (0.0, 1 / 6 if phase == 0 else 1 / 3, acc_hist)
        res = self._combine(model_output, uncond_output, guidance_scale, t, prev_t, on_x, on_hist, eps_x,
                            eps_hist, sample, history, aux)
        if phase == 0:
            self.ets.append(res[1])
            self.cur_sample = sample
        self.cur_model_output = res[2] if aux is not None else 0
        return res[0]

    def _step_plms(self, model_output, timestep, sample, uncond_output, guidance_scale):
        # diffusers' step_plms: e' = Adams-Bashforth over the kept epsilons (this step's appended, except
        # at counter 1, where the first step is repeated from cur_sample: averaged with the kept one if
        # there is one kept, else the kept ones alone)
        cfg = self.config
        if not cfg.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{type(self).__name__} can only be run AFTER scheduler has been run in 'prk' mode for at least 12 "
                "iterations. See: https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/"
                "pipeline_pndm.py for more information."
            )
        ratio = cfg.num_train_timesteps // self.num_inference_steps
        prev_t = timestep - ratio
        if self.counter == 1:
            prev_t, timestep = timestep, timestep + ratio
        if self.counter == 1 and len(self.ets) == 1:
            # e' = (eps + ets[-1]) / 2 from cur_sample; the current eps is not kept
            res = self._combine(model_output, uncond_output, guidance_scale, timestep, prev_t, 0.0, [1.0, 0.0],
                                0.5, [0.0, 0.5], sample, [self.cur_sample, self.ets[-1]])
            self.cur_sample = None
            return res[0]
        if self.counter == 1:  # the kept epsilons alone; this step's output is neither used nor kept
            history = self.ets[::-1][:4]
            w = _PLMS[len(history)]
            res = self._combine(model_output, uncond_output, guidance_scale, timestep, prev_t, 1.0,
                                [0.0] * len(history), 0.0, w, sample, history)
            return res[0]
        kept = self.ets[-3:]
        w = _PLMS[len(kept) + 1]  # w[0] for this step's eps, w[j] for kept[-j]
        history = kept[::-1]
        res = self._combine(model_output, uncond_output, guidance_scale, timestep, prev_t, 1.0, [0.0] * len(history),
                            w[0], w[1:], sample, history)
        self.ets = kept + [res[1]]
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        return res[0]
