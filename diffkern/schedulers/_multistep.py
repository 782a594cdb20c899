"""What the VP multistep solvers share (DPM-Solver++ and UniPC): alpha_t / sigma_t / lambda_t of a
sigma, the integer inference timesteps per spacing, the step counter with diffusers' lookup, and
add_noise in VP form."""

from __future__ import annotations

import math

import numpy as np
import torch

from diffkern.schedulers._sigmas import _StepIndexed

# diffusers' typical spacing for VP multistep solvers: N + 1 points, the last dropped
def vp_timesteps(num_train_timesteps, n, spacing, steps_offset, last_timestep=None):
    """int64 descending timesteps of DPM-Solver / UniPC for n inference steps."""
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of a k-diffusion sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha."""
    a = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return a, sigma * a


def log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t) (inf at sigma = 0)."""
    a, s = alpha_sigma(sigma)
    return math.inf if s == 0 else math.log(a) - math.log(s)


class _VPMultistep(_StepIndexed):
    """Base of DPM-Solver++ / UniPC: VP schedule (init_noise_sigma 1, unscaled model input)."""

    def _post_init(self):
        acp = self.alphas_cumprod
        self.alpha_t = torch.sqrt(acp)
        self.sigma_t = torch.sqrt(1 - acp)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - acp) / acp) ** 0.5
        T = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Position of `timestep` (the second match if twice; the last step if absent, as diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        hits = (schedule_timesteps == timestep).nonzero()
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return hits[1 if len(hits) > 1 else 0].item()

    def scale_model_input(self, sample, *args, **kwargs):
        """Identity: VP solvers feed the sample unscaled."""
        return sample

    def _final_sigma(self):
        if self.config.final_sigmas_type == "sigma_min":
            a0 = self.alphas_cumprod[0]
            return ((1 - a0) / a0) ** 0.5
        return 0

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t x0 + sigma_t noise at the inference sigma of each timestep."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if self.begin_index is None:
            idx = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self.step_index is not None:
            idx = [self.step_index] * timesteps.shape[0]
        else:
            idx = [self.begin_index] * timesteps.shape[0]
        sigma = sigmas[idx].flatten().reshape((-1,) + (1,) * (original_samples.dim() - 1))
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t * original_samples + sigma * alpha_t * noise

    def _x0_row(self, sigma):
        """(cx, cp) of the data prediction x0 at this sigma for the prediction type."""
        a, s = alpha_sigma(sigma)
        p = self.config.prediction_type
        if p == "epsilon":
            return 1.0 / a, -s / a
        if p == "v_prediction":
            return a, -s
        return 0.0, 1.0

    def _clip(self):
        return "dynamic" if self.config.thresholding else "none"

    def _prepare_output(self, model_output, uncond_output):
        """diffusers keeps the first 3 channels of a learned-variance epsilon output."""
        cfg = self.config
        if cfg.get("variance_type") in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, :3]
            uncond_output = None if uncond_output is None else uncond_output[:, :3]
        return model_output, uncond_output
