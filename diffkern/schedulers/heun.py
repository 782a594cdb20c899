"""Heun's second-order sampler (Karras et al. 2022, Algorithm 1 without churn), a drop-in for diffusers'
HeunDiscreteScheduler. Each of a step's two stages is one fused sampler_update call; the first also
writes its derivative (x - x0) / sigma as the op's second output, for the second stage."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from diffkern.schedulers._sigmas import _KarrasSigmaScheduler, spaced_timesteps


class HeunDiscreteScheduler(_KarrasSigmaScheduler):
    """Heun sampler with diffusers' HeunDiscreteScheduler config and step contract (order 2: every
    inner timestep appears twice). Prediction epsilon / v_prediction / sample, clip_sample, Karras or
    exponential sigmas. `step` also takes `uncond_output` + `guidance_scale`."""

    order = 2
    _rejects_int_timesteps = False
    _defaults: ClassVar[dict] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    _unsupported: ClassVar[dict] = {"use_beta_sigmas": (False, "needs scipy's beta distribution")}

    def _post_init(self):
        super()._post_init()
        self.set_timesteps(self.config.num_train_timesteps, None, self.config.num_train_timesteps)

    def set_timesteps(self, num_inference_steps=None, device=None, num_train_timesteps=None, timesteps=None):
        """Spaced (or custom) timesteps and sigmas, each inner one repeated for the second stage."""
        cfg = self.config
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas` / `use_exponential_sigmas`")
        n = num_inference_steps or len(timesteps)
        self.num_inference_steps = n
        T = num_train_timesteps or cfg.num_train_timesteps
        if timesteps is not None:
            ts = np.array(timesteps, dtype=np.float32)
        else:
            ts = spaced_timesteps(T, n, cfg.timestep_spacing, cfg.steps_offset)
        sigmas, ts = self._sigmas_for(ts, n)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).to("cpu")
        ts = torch.from_numpy(ts)
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)]).to(device=device, dtype=torch.float32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._reset_index()

    @property
    def state_in_first_order(self):
        """True when the next step is a first (Euler) stage."""
        return self.dt is None

    def _warn_unscaled(self):  # diffusers' Heun does not warn
        pass

    def step(self, model_output, timestep, sample, return_dict=True, *, uncond_output=None, guidance_scale=1.0):
        """One Heun stage; returns (prev_sample, pred_original_sample)."""
        self._check_timestep(timestep)
        i = self.step_index
        first = self.state_in_first_order
        sigma = float(self.sigmas[i] if first else self.sigmas[i - 1])
        sigma_next = float(self.sigmas[i + 1] if first else self.sigmas[i])
        s_in = sigma if first else sigma_next
        cx, cp = self._x0_coeffs(s_in)
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
