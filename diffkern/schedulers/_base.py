"""What DDPM and DDIM share: diffusers-style config, schedule tensors, noise, add_noise."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from diffkern import ops
from diffkern.schedulers._config import ConfigMixin, FrozenConfig, SchedulerOutput  # noqa: F401 (re-exported)
from diffkern.schedulers.schedules import BETA_SCHEDULES, make_betas, space_timesteps

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def randn_like_diffusers(shape, generator, device, dtype):
    """torch.randn drawn exactly as diffusers' `randn_tensor` draws it (same generator calls)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, (list, tuple)) else generator.device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw a {device} tensor from a generator on {gen_type}")
            rand_device = torch.device("cpu")  # CPU generator: draw on CPU, then move (as diffusers does)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1,) + tuple(shape[1:])
        return torch.cat(
            [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        ).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


class ConfigValueError(ValueError, NotImplementedError):
    """An invalid config value (a ValueError naming the key; also a NotImplementedError where
    diffusers raises that, e.g. for an unknown beta_schedule)."""


class _Scheduler(ConfigMixin):
    """Base: subclasses set `_defaults` (diffusers' config keys plus ours) and implement `step`."""

    _defaults: ClassVar[dict] = {}
    order = 1

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self._defaults))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown config keys {unknown}; known: {sorted(self._defaults)}"
            )
        cfg = dict(self._defaults)
        cfg.update(config)
        if cfg.get("trained_betas") is not None and not isinstance(cfg["trained_betas"], list):
            cfg["trained_betas"] = [float(b) for b in torch.as_tensor(cfg["trained_betas"]).flatten()]
        self._validate(cfg)
        if cfg.get("timestep_respacing", 0) is None:  # our extension: absent unless used, so configs stay
            del cfg["timestep_respacing"]  # loadable by diffusers without an "unexpected key" warning
        self._internal_dict = FrozenConfig(cfg)
        self._build_schedule(cfg)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.use_timesteps = None
        if cfg.get("timestep_respacing") is not None:
            self.use_timesteps = sorted(
                space_timesteps(cfg["num_train_timesteps"], cfg["timestep_respacing"])
            )
        self._post_init()

    def _build_schedule(self, cfg):
        """betas / alphas / alphas_cumprod from the config, as diffusers builds them."""
        self.betas = make_betas(
            cfg["num_train_timesteps"],
            cfg["beta_start"],
            cfg["beta_end"],
            cfg["beta_schedule"],
            cfg["trained_betas"],
            cfg.get("rescale_betas_zero_snr", False),
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _validate(self, cfg):
        """ValueError naming the key for an invalid value of any key this class has."""
        name = type(self).__name__
        n = cfg.get("num_train_timesteps")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}: num_train_timesteps must be a positive int, got {n!r}")
        choices = {
            "prediction_type": getattr(self, "_prediction_types", PREDICTION_TYPES),
            "timestep_spacing": self._spacings,
            "beta_schedule": getattr(self, "_beta_schedules", BETA_SCHEDULES),
        }
        for key, allowed in choices.items():
            if key in cfg and cfg[key] not in allowed:
                if key == "beta_schedule" and cfg.get("trained_betas") is not None:
                    continue  # trained_betas wins, as in diffusers
                raise ConfigValueError(f"{name}: {key} must be one of {tuple(allowed)}, got {cfg[key]!r}")
        if cfg.get("thresholding") and not 0 < cfg["dynamic_thresholding_ratio"] <= 1:
            raise ValueError(
                f"{name}: dynamic_thresholding_ratio must be in (0, 1], "
                f"got {cfg['dynamic_thresholding_ratio']!r}"
            )
        for key in ("beta_start", "beta_end", "clip_sample_range", "sample_max_value"):
            v = cfg.get(key)
            if key in cfg and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{name}: {key} must be a number, got {v!r}")

    _spacings = TIMESTEP_SPACINGS

    def _post_init(self):
        pass

    def __len__(self):
        return self.config.num_train_timesteps

    # -- diffusers scheduler API ----------------------------------------------------------------
    def scale_model_input(self, sample, timestep=None):
        """Identity (DDPM/DDIM do not scale the model input); present for the diffusers contract."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """Forward process q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per-sample t."""
        sa, s1m = self._sqrt_abars(timesteps, original_samples)
        return sa * original_samples + s1m * noise

    def get_velocity(self, sample, noise, timesteps):
        """v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        sa, s1m = self._sqrt_abars(timesteps, sample)
        return sa * noise - s1m * sample

    def _sqrt_abars(self, timesteps, like):
        """sqrt(abar_t), sqrt(1 - abar_t) per sample, shaped to broadcast against `like`."""
        acp = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        acp = acp[torch.as_tensor(timesteps, device=like.device)].flatten()
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (acp ** 0.5).view(shape), ((1 - acp) ** 0.5).view(shape)

    # -- helpers for step ------------------------------------------------------------------------
    def _abar(self, t):
        return float(self.alphas_cumprod[int(t)])

    def _respaced_timesteps(self, num_inference_steps, device):
        if num_inference_steps is not None and num_inference_steps != len(self.use_timesteps):
            raise ValueError(
                f"{type(self).__name__}: timestep_respacing={self.config.timestep_respacing!r} keeps "
                f"{len(self.use_timesteps)} steps; call set_timesteps(None) or with that number, "
                f"got {num_inference_steps}"
            )
        self.num_inference_steps = len(self.use_timesteps)
        self.timesteps = torch.tensor(self.use_timesteps[::-1], dtype=torch.int64, device=device)

    def _spaced_timesteps(self, num_inference_steps, device, reverse=True):
        cfg = self.config
        n, N = num_inference_steps, cfg.num_train_timesteps
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}: num_inference_steps must be a positive int, got {n!r}")
        if n > N:
            raise ValueError(
                f"{type(self).__name__}: num_inference_steps={n} cannot exceed num_train_timesteps={N}"
            )
        self.num_inference_steps = n
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, N - 1, n).round().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (N // n)).round().astype(np.int64) + cfg.steps_offset
        else:  # trailing
            ts = np.round(np.arange(N, 0, -N / n))[::-1].astype(np.int64) - 1
        ts = torch.from_numpy(ts.copy())
        if reverse:
            ts = ts.flip(0)
        self.timesteps = ts.to(device)

    def _noise(self, shape, model_output, generator, variance_noise):
        """The step's noise: the caller's variance_noise, or drawn as diffusers draws it."""
        if variance_noise is not None and generator is not None:
            raise ValueError(f"{type(self).__name__}.step: pass generator or variance_noise, not both")
        if variance_noise is not None:
            return variance_noise
        return randn_like_diffusers(shape, generator, model_output.device, model_output.dtype)

    def _call_step(
        self,
        sample,
        model_output,
        coeffs,
        *,
        uncond_output,
        guidance_scale,
        noise,
        eps_from_clipped,
        return_dict,
        variance="fixed",
    ):
        """Run guided_step once and return step's output (eps_from_clipped=False is diffusers' DDIM
        default: x0 clipped, the eps term from the unclipped prediction; the op does both in its pass)."""
        cfg = self.config
        clip = "dynamic" if cfg.get("thresholding") else ("static" if cfg.clip_sample else "none")
        prev, x0 = ops.guided_step(
            sample, model_output, coeffs.to(sample.device), uncond_output=uncond_output,
            guidance_scale=guidance_scale, prediction_type=cfg.prediction_type, clip=clip,
            clip_range=cfg.clip_sample_range, dynamic_percentile=cfg.get("dynamic_thresholding_ratio", 0.995),
            dynamic_max_value=cfg.get("sample_max_value", 1.0), variance=variance, noise=noise,
            eps_from_clipped=eps_from_clipped)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)


    def _ancestral_step(self, sample, model_output, coeffs, t, *, uncond_output, guidance_scale, generator,
                        variance_noise, return_dict, learned):
        """DDPM-style posterior step (DDPM, unCLIP): noise drawn for t > 0, eps from the clipped x0."""
        noise = self._noise(sample.shape, model_output, generator, variance_noise) if t > 0 else None
        return self._call_step(sample, model_output, coeffs, uncond_output=uncond_output,
                               guidance_scale=guidance_scale, noise=noise, eps_from_clipped=True,
                               return_dict=return_dict, variance="learned_range" if learned else "fixed")


def coeff_rows(batch, values):
    """(B, len(values)) float32 coefficients computed in float64."""
    return (
        torch.tensor([values], dtype=torch.float64).to(torch.float32).expand(batch, len(values)).contiguous()
    )


def sqrt(x):
    return math.sqrt(max(x, 0.0))
