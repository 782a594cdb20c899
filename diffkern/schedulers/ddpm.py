"""DDPM ancestral sampling (Ho et al. 2020, eq. 6-7): diffusers' DDPMScheduler with the step computed
by one fused guided_step call, plus GLIDE / improved-DDPM `timestep_respacing`."""

from __future__ import annotations

import diffusers
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from diffkern.schedulers._base import FusedStep, init_respacing, threshold_fallback, with_extension_keys

FUSED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDPMScheduler(FusedStep, diffusers.DDPMScheduler):
    """diffusers' DDPMScheduler (config, timesteps, add_noise, save / load are the parent's); `step` is
    one fused guided_step call and also takes `uncond_output` + `guidance_scale` (classifier-free
    guidance in the same op) and `variance_noise` (instead of drawing from `generator`).

    Extension key `timestep_respacing` (improved-DDPM / GLIDE section counts such as "100", "ddim50",
    "fast27", "10,10,10"): set_timesteps runs exactly the kept timesteps as diffusers' custom
    timesteps, so each step's beta is 1 - abar_t / abar_prev, improved DDPM's respaced process.
    variance_type "learned" and "fixed_large_log" run diffusers' step (`fallback_reason`).
    """

    _output_cls = DDPMSchedulerOutput

    def __init__(self, *args, timestep_respacing=None, **kwargs):
        super().__init__(*args, **kwargs)
        init_respacing(self, timestep_respacing)
        if self.use_timesteps is not None:
            self.set_timesteps()

    __init__.__signature__ = with_extension_keys(diffusers.DDPMScheduler, timestep_respacing=None)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """diffusers' set_timesteps; with `timestep_respacing` the respaced timesteps (custom timesteps)."""
        if self.use_timesteps is None:
            return super().set_timesteps(num_inference_steps, device, timesteps)
        kept = self.use_timesteps
        if timesteps is not None:
            raise ValueError("DDPMScheduler.set_timesteps: custom timesteps conflict with timestep_respacing")
        if num_inference_steps is not None and num_inference_steps != len(kept):
            raise ValueError(
                f"DDPMScheduler: timestep_respacing={self.config.timestep_respacing!r} keeps {len(kept)} steps; "
                f"call set_timesteps(None) or with that number, got {num_inference_steps}")
        super().set_timesteps(device=device, timesteps=kept[::-1])
        self.num_inference_steps = len(kept)

    def fallback_reason(self, model_output=None, sample=None, **step_kwargs):
        vt, pt = self.config.variance_type, self.config.prediction_type
        if vt not in FUSED_VARIANCES:
            return f"variance_type={vt!r}"
        if pt not in PREDICTION_TYPES:
            return f"prediction_type={pt!r}"
        if vt == "learned_range" and model_output is not None and model_output.shape[1] == sample.shape[1]:
            return "variance_type='learned_range' without variance channels"
        return threshold_fallback(self.config)

    def step_coefficients(self, timestep, batch=1):
        """(B, 6) or (B, 8) float32 [sa, s1m, c_x0, c_xt, c_eps, sigma(, min_log, max_log)] of one step,
        computed in float32 tensor arithmetic in diffusers' order (step and _get_variance), so that a
        1000-step chain stays on diffusers' trajectory to float32 rounding."""
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha = a_t / a_prev
        beta = 1 - alpha
        var = torch.clamp(b_prev / b_t * beta, min=1e-20)
        vt = self.config.variance_type
        if t == 0:
            sigma = torch.zeros(())
        elif vt == "fixed_small_log":
            sigma = torch.exp(0.5 * torch.log(var))
        else:
            sigma = (beta if vt == "fixed_large" else var) ** 0.5
        row = [a_t ** 0.5, b_t ** 0.5, a_prev ** 0.5 * beta / b_t, alpha ** 0.5 * b_prev / b_t, torch.zeros(()), sigma]
        if vt == "learned_range":
            row += [torch.log(var), torch.log(beta)]
        return torch.stack(row).to(torch.float32).expand(batch, len(row)).contiguous()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, *, uncond_output=None,
             guidance_scale=1.0, variance_noise=None):
        """One reverse step x_t -> x_{t-1}; noise drawn as diffusers draws it (none at t = 0)."""
        why = self.fallback_reason(model_output, sample)
        if why is not None:
            if variance_noise is not None:
                raise ValueError(f"DDPMScheduler: variance_noise is not taken with {why}")
            return self._parent_step(model_output, timestep, sample, generator=generator, return_dict=return_dict,
                                     uncond_output=uncond_output, guidance_scale=guidance_scale)
        t = int(timestep)
        C = sample.shape[1]
        learned = self.config.variance_type == "learned_range"
        if model_output.shape[1] != (2 * C if learned else C):
            need = f"2*C={2 * C}" if learned else f"the sample's {C}"
            raise ValueError(f"DDPMScheduler: variance_type={self.config.variance_type!r} needs model_output with "
                             f"{need} channels, got {model_output.shape[1]}")
        coeffs = self.step_coefficients(t, sample.shape[0])
        noise = self._noise(sample.shape, model_output, generator, variance_noise) if t > 0 else None
        prev, x0 = self._guided(sample, model_output, coeffs, uncond_output=uncond_output,
                                guidance_scale=guidance_scale, noise=noise, eps_from_clipped=True,
                                variance="learned_range" if learned else "fixed")
        return self._output(prev, x0, return_dict)
