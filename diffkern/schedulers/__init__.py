"""diffusers' scheduler classes with the step computed by diffkern's fused ops.

Each class here IS diffusers' class of the same name, subclassed: config, from_config /
from_pretrained / save_pretrained, compatibles, set_timesteps, sigmas, add_noise and
scale_model_input are diffusers' own; `step` is one fused `diffkern.ops.guided_step` (DDPM, DDIM,
DDIMInverse, UnCLIP) or `diffkern.ops.sampler_update` (the others) call, equal to diffusers' step to
float32 rounding. Extensions: `step(..., uncond_output=, guidance_scale=)` fuses classifier-free
guidance into the same op; DDPM / DDIM take the config key `timestep_respacing` (GLIDE /
improved-DDPM "100", "ddim50", "fast27"); learned-range variance (GLIDE, unCLIP) is fused.

Options the fused op cannot express run diffusers' own step (`super().step`, after the guidance
combine a pipeline would do); `scheduler.fallback_reason(...)` names the option:

| scheduler | runs diffusers' step for |
| --- | --- |
| DDPMScheduler | variance_type "learned", "fixed_large_log" (or another type diffusers takes); "learned_range" with no variance channels in model_output |
| DDIMScheduler | thresholding with sample_max_value < 1 (diffusers' clamp to [1, max] is then max) |
| DDIMInverseScheduler | (none) |
| UnCLIPScheduler | variance_type other than "fixed_small_log" / "learned_range"; "learned_range" with no variance channels |
| EulerDiscreteScheduler | s_churn > 0 within [s_tmin, s_tmax] (noise added before the x0) |
| EulerAncestralDiscreteScheduler | prediction_type "sample" (diffusers raises NotImplementedError) |
| HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler | (none) |
| DPMSolverMultistepScheduler | algorithm_type "dpmsolver" / "sde-dpmsolver" (noise prediction); use_flow_sigmas; thresholding with sample_max_value < 1 |
| UniPCMultistepScheduler | solver_p (an external predictor); use_flow_sigmas; thresholding with sample_max_value < 1 |

Every class also hands an unknown prediction_type to diffusers' step, which raises its own error.

    import diffkern.schedulers as S
    pipe.scheduler = S.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = S.scheduler_class("EulerDiscreteScheduler").from_config(pipe.scheduler.config)
    x0 = S.sample_loop(model_fn, S.DDPMScheduler(timestep_respacing="100"), (1, 3, 64, 64))
"""

from diffusers.configuration_utils import FrozenDict as FrozenConfig
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils import BaseOutput

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


# short names (the sampler names UIs use) -> (class name, config overrides on top of a checkpoint's config)
ALIASES = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler",
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m_sde_karras": ("DPMSolverMultistepScheduler",
                           {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unclip": ("UnCLIPScheduler", {}),
}


def from_name(name, config=None, **overrides):
    """A scheduler from a diffusers class name ("EulerDiscreteScheduler") or a short name of ALIASES
    ("dpm++2m_karras"), built with from_config on `config` (e.g. a checkpoint's scheduler config: its
    betas carry over, other schedulers' keys are ignored) plus the alias's and the caller's overrides."""
    if name in SCHEDULERS:
        cls, extra = SCHEDULERS[name], {}
    elif isinstance(name, str) and name.lower() in ALIASES:
        cls_name, extra = ALIASES[name.lower()]
        cls = SCHEDULERS[cls_name]
    else:
        raise ValueError(f"no diffkern scheduler named {name!r}; available: {sorted(SCHEDULERS)} or the "
                         f"short names {sorted(ALIASES)}")
    return cls.from_config(config or {}, **{**extra, **overrides})


def scheduler_class(name):
    """The diffkern scheduler class for a diffusers class name (e.g. "EulerDiscreteScheduler")."""
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"no diffkern scheduler named {name!r}; available: {sorted(SCHEDULERS)}") from None


__all__ = [
    "ALIASES",
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
    "rescale_zero_terminal_snr",
    "respaced_betas",
    "denoise_loop",
    "from_name",
    "sample_loop",
    "scheduler_class",
    "space_timesteps",
]
