"""What the sigma-indexed samplers share (Euler, Euler ancestral, Heun, LMS, DPM-Solver++, UniPC):
inference timesteps per spacing, Karras / exponential sigmas, sigma -> timestep interpolation, the
step index counter, and the one fused sampler_update call of a step. All of it computes the schedule
exactly as diffusers does (numpy float32 / float64 where diffusers uses them), so trajectories match."""

from __future__ import annotations

import logging

import numpy as np
import torch

from diffkern import ops
from diffkern.schedulers._base import _Scheduler
from diffkern.schedulers._config import SchedulerOutput

logger = logging.getLogger("diffkern.schedulers")


def spaced_timesteps(num_train_timesteps, n, spacing, steps_offset):
    """float32 descending timesteps (diffusers' linspace / leading / trailing for sigma samplers)."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return ts + steps_offset
    if spacing == "trailing":
        ratio = T / n
        return np.arange(T, 0, -ratio).round().copy().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022 eq. 5: (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min, sigma_max, n):
    """Log-uniform sigmas from sigma_max to sigma_min."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


def sigma_to_t(sigma, log_sigmas):
    """Fractional timestep of `sigma` by linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(np.shape(sigma))


def convert_sigmas(cfg, sigmas, n, log_sigmas):
    """(sigmas, timesteps) after the config's Karras / exponential choice, or None for neither."""
    if not (cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas")):
        return None
    lo = cfg.get("sigma_min")
    hi = cfg.get("sigma_max")
    lo = lo if lo is not None else float(sigmas[-1])
    hi = hi if hi is not None else float(sigmas[0])
    out = karras_sigmas(lo, hi, n) if cfg.get("use_karras_sigmas") else exponential_sigmas(lo, hi, n)
    return out, np.array([sigma_to_t(s, log_sigmas) for s in out])


class _FusedStep:
    """The one sampler_update call of a step, from a coefficient row of python floats."""

    def _fused(self, sample, model_output, row, history=(), *, uncond_output=None, guidance_scale=1.0,
               noise=None, aux=False, clip="none", clip_range=1.0):
        """One sampler_update call with a per-batch coefficient row (python floats)."""
        # python floats (doubles) round to float32 once, here; one small tensor per step
        coeffs = torch.tensor([row] * sample.shape[0], dtype=torch.float32)
        if sample.device.type != "cpu":
            coeffs = coeffs.to(sample.device)
        cfg = self.config
        return ops.sampler_update(
            sample, model_output, coeffs, list(history), uncond_output=uncond_output,
            guidance_scale=guidance_scale, clip=clip, clip_range=clip_range,
            dynamic_percentile=cfg.get("dynamic_thresholding_ratio", 0.995),
            dynamic_max_value=cfg.get("sample_max_value", 1.0), noise=noise, aux=aux)

    @staticmethod
    def _output(prev, x0, return_dict):
        if not return_dict:
            return (prev, x0) if x0 is not None else (prev,)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class _StepIndexed(_FusedStep, _Scheduler):
    """Samplers that walk a sigma table by a step index (diffusers' _step_index / _begin_index)."""

    _spacings = ("linspace", "leading", "trailing")
    _unsupported: dict = {}  # config key -> (value that is fine, why others are not supported)

    def _validate(self, cfg):
        super()._validate(cfg)
        name = type(self).__name__
        if sum(bool(cfg.get(k)) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
            raise ValueError(f"{name}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas "
                             "can be set")
        for key, (ok, why) in self._unsupported.items():
            if key in cfg and cfg[key] != ok and not (isinstance(ok, tuple) and cfg[key] in ok):
                raise NotImplementedError(f"{name}: {key}={cfg[key]!r} is not supported by diffkern ({why})")

    def _build_schedule(self, cfg):
        super()._build_schedule(cfg)
        if cfg.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # diffusers: a finite last sigma instead of inf

    def _reset_index(self):
        self._step_index = None
        self._begin_index = None

    def _sigma(self, i):
        """float(self.sigmas[i]) from a list cached per sigmas tensor (indexing a tensor per
        coefficient costs more than the rest of the step's Python)."""
        if getattr(self, "_sigma_src", None) is not self.sigmas:
            self._sigma_list = self.sigmas.tolist()
            self._sigma_src = self.sigmas
        return self._sigma_list[i]

    @property
    def step_index(self):
        """Index of the current timestep; +1 after each step."""
        return self._step_index

    @property
    def begin_index(self):
        """Index of the first timestep (set by pipelines with set_begin_index, e.g. img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        """Start at timesteps[begin_index] (pipelines call it before the denoising loop)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        """Position of `timestep` in the schedule (the second match when it occurs twice, as diffusers:
        so image-to-image starting mid-schedule does not skip a sigma)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        hits = (schedule_timesteps == timestep).nonzero()
        if len(hits) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {timestep!r} is not in scheduler.timesteps")
        return hits[1 if len(hits) > 1 else 0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _check_timestep(self, timestep):
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)) and self._rejects_int_timesteps:
            raise ValueError(
                f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                f"`{type(self).__name__}.step()` is not supported. Make sure to pass one of the "
                "`scheduler.timesteps` as a timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)

    _rejects_int_timesteps = False


class _KarrasSigmaScheduler(_StepIndexed):
    """k-diffusion style samplers (sigma space, model input scaled by 1 / sqrt(sigma^2 + 1))."""

    _rejects_int_timesteps = True

    def _post_init(self):
        acp = self.alphas_cumprod
        sigmas = (((1 - acp) / acp) ** 0.5).flip(0)
        T = self.config.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=float)[::-1].copy()).to(torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False
        self._reset_index()

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    @init_noise_sigma.setter
    def init_noise_sigma(self, value):  # the base class sets 1.0; the property is the truth here
        pass

    def scale_model_input(self, sample, timestep):
        """x / sqrt(sigma^2 + 1): the model sees unit-variance input (k-diffusion's c_in)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def _warn_unscaled(self):
        if not self.is_scale_input_called:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising. "
                "See `StableDiffusionPipeline` for a usage example."
            )

    def _train_sigmas(self):
        acp = self.alphas_cumprod
        sigmas = np.array(((1 - acp) / acp) ** 0.5)
        return sigmas, np.log(sigmas)

    def _sigmas_for(self, timesteps, n):
        """(sigmas, timesteps) float arrays for float32 `timesteps` (interpolated, then converted)."""
        sigmas, log_sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        conv = convert_sigmas(self.config, sigmas, n, log_sigmas)
        return conv if conv is not None else (sigmas, timesteps)

    def add_noise(self, original_samples, noise, timesteps):
        """x + sigma_t noise (the sample in sigma space), per-sample timesteps from scheduler.timesteps."""
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
        return original_samples + noise * sigma

    def _x0_coeffs(self, sigma):
        """(cx, cp) of the denoised value in sigma space for this prediction type."""
        p = self.config.prediction_type
        if p == "epsilon":
            return 1.0, -sigma
        if p == "v_prediction":
            return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
        return 0.0, 1.0  # sample
