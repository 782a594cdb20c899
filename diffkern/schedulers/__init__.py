"""Schedulers with the diffusers scheduler contract (config, save/load, step outputs), GLIDE /
improved-DDPM respacing, and a sampling loop. Every step's element-wise update is one fused op.

    import diffkern.schedulers as S
    pipe.scheduler = S.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = S.scheduler_class("EulerDiscreteScheduler").from_config(pipe.scheduler.config)
    x0 = S.sample_loop(model_fn, S.DDPMScheduler(timestep_respacing="100"), (1, 3, 64, 64))
"""

from diffkern.schedulers._config import BaseOutput, FrozenConfig, SchedulerOutput
from diffkern.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler
from diffkern.schedulers.ddpm import DDPMScheduler
from diffkern.schedulers.dpmsolver import DPMSolverMultistepScheduler
from diffkern.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffkern.schedulers.heun import HeunDiscreteScheduler
from diffkern.schedulers.lms import LMSDiscreteScheduler
from diffkern.schedulers.pndm import PNDMScheduler
from diffkern.schedulers.sampling import denoise_loop, sample_loop
from diffkern.schedulers.schedules import (
    betas_for_alpha_bar,
    make_betas,
    rescale_zero_terminal_snr,
    respaced_betas,
    space_timesteps,
)
from diffkern.schedulers.unclip import UnCLIPScheduler
from diffkern.schedulers.unipc import UniPCMultistepScheduler

# diffusers class name -> diffkern class (the names diffusers' scheduler_config.json `_class_name` uses)
SCHEDULERS = {
    cls.__name__: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        DDIMInverseScheduler,
        UnCLIPScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
        HeunDiscreteScheduler,
        LMSDiscreteScheduler,
    )
}


def scheduler_class(name):
    """The diffkern scheduler class for a diffusers class name (e.g. "EulerDiscreteScheduler")."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"no diffkern scheduler named {name!r}; available: {sorted(SCHEDULERS)}") from None


__all__ = [
    "SCHEDULERS",
    "BaseOutput",
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FrozenConfig",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerOutput",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "betas_for_alpha_bar",
    "make_betas",
    "rescale_zero_terminal_snr",
    "respaced_betas",
    "denoise_loop",
    "sample_loop",
    "scheduler_class",
    "space_timesteps",
]
