"""Schedulers: DDPM / DDIM (+ inversion) with the diffusers scheduler contract, GLIDE /
improved-DDPM respacing, and a sampling loop. Every step is one call of the fused guided_step.

    import diffkern.schedulers as S
    pipe.scheduler = S.DDIMScheduler.from_config(pipe.scheduler.config)
    x0 = S.sample_loop(model_fn, S.DDPMScheduler(timestep_respacing="100"), (1, 3, 64, 64))
"""

from diffkern.schedulers._base import FrozenConfig, SchedulerOutput
from diffkern.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler
from diffkern.schedulers.ddpm import DDPMScheduler
from diffkern.schedulers.sampling import denoise_loop, sample_loop
from diffkern.schedulers.schedules import (
    betas_for_alpha_bar,
    make_betas,
    rescale_zero_terminal_snr,
    respaced_betas,
    space_timesteps,
)


__all__ = [
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "FrozenConfig",
    "SchedulerOutput",
    "betas_for_alpha_bar",
    "make_betas",
    "rescale_zero_terminal_snr",
    "respaced_betas",
    "denoise_loop",
    "sample_loop",
    "space_timesteps",
]
