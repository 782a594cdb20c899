"""The sigma-space and multistep samplers against diffusers' classes of the same name, step for step
over a table of their main config options (with classifier-free guidance fused into the step)."""

import pytest

import diffkern.schedulers as S

from ._sampler_table import diffusers_lms_class, run_pair

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
V_TRAILING = {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
LEADING = {**SD, "timestep_spacing": "leading", "steps_offset": 1}
ZERO_SNR = {**V_TRAILING, "rescale_betas_zero_snr": True}

# (class name, config, steps); every entry runs with guidance 7.5 (and the first of each also without)
TABLE = [
    ("EulerDiscreteScheduler", {}, 10),
    ("EulerDiscreteScheduler", SD, 12),
    ("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True}, 12),
    ("EulerDiscreteScheduler", {**SD, "use_exponential_sigmas": True}, 9),
    ("EulerDiscreteScheduler", V_TRAILING, 12),
    ("EulerDiscreteScheduler", ZERO_SNR, 8),
    ("EulerDiscreteScheduler", LEADING, 12),
    ("EulerDiscreteScheduler", {**SD, "prediction_type": "sample", "final_sigmas_type": "sigma_min"}, 7),
    ("EulerDiscreteScheduler", {**SD, "timestep_type": "continuous", "prediction_type": "v_prediction"}, 7),
    ("EulerAncestralDiscreteScheduler", SD, 12),
    ("EulerAncestralDiscreteScheduler", V_TRAILING, 10),
    ("EulerAncestralDiscreteScheduler", LEADING, 10),
    ("EulerAncestralDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}, 6),
    ("DPMSolverMultistepScheduler", SD, 20),
    ("DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, 20),
    ("DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, 8),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 3}, 20),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 3, "use_karras_sigmas": True, "lower_order_final": False}, 10),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 1}, 8),
    ("DPMSolverMultistepScheduler", {**SD, "solver_type": "heun"}, 10),
    ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++"}, 12),
    ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 16),
    ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                                     "use_karras_sigmas": True}, 10),
    ("DPMSolverMultistepScheduler", V_TRAILING, 12),
    ("DPMSolverMultistepScheduler", {**LEADING, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 10),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}, 8),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, 10),
    ("DPMSolverMultistepScheduler", {**SD, "use_exponential_sigmas": True}, 12),
    ("PNDMScheduler", {**LEADING, "skip_prk_steps": True}, 25),
    ("PNDMScheduler", {**LEADING, "skip_prk_steps": True}, 6),
    ("PNDMScheduler", {}, 10),
    ("PNDMScheduler", {**V_TRAILING, "set_alpha_to_one": True}, 12),
    ("PNDMScheduler", {**V_TRAILING, "skip_prk_steps": True}, 8),
    ("PNDMScheduler", {"timestep_spacing": "linspace", "skip_prk_steps": True}, 9),
    ("UniPCMultistepScheduler", SD, 20),
    ("UniPCMultistepScheduler", SD, 8),
    ("UniPCMultistepScheduler", {**SD, "use_karras_sigmas": True}, 12),
    ("UniPCMultistepScheduler", {**SD, "solver_order": 3}, 20),
    ("UniPCMultistepScheduler", {**SD, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10),
    ("UniPCMultistepScheduler", {**SD, "solver_order": 1}, 8),
    ("UniPCMultistepScheduler", V_TRAILING, 10),
    ("UniPCMultistepScheduler", {**SD, "disable_corrector": [0, 3]}, 10),
    ("UniPCMultistepScheduler", {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}, 8),
    ("UniPCMultistepScheduler", {**SD, "predict_x0": False, "final_sigmas_type": "sigma_min"}, 10),
    ("UniPCMultistepScheduler", {**LEADING, "use_exponential_sigmas": True}, 9),
    ("HeunDiscreteScheduler", SD, 8),
    ("HeunDiscreteScheduler", {**SD, "use_karras_sigmas": True}, 10),
    ("HeunDiscreteScheduler", V_TRAILING, 6),
    ("HeunDiscreteScheduler", {**LEADING, "prediction_type": "sample", "clip_sample": True}, 6),
    ("LMSDiscreteScheduler", SD, 12),
    ("LMSDiscreteScheduler", {**SD, "use_karras_sigmas": True}, 10),
    ("LMSDiscreteScheduler", V_TRAILING, 8),
    ("LMSDiscreteScheduler", {**LEADING, "prediction_type": "sample", "use_exponential_sigmas": True}, 8),
]


def _theirs(name):
    return diffusers_lms_class() if name == "LMSDiscreteScheduler" else getattr(diffusers, name)


def _id(entry):
    name, cfg, steps = entry
    return f"{name.replace('Scheduler', '')}-{'-'.join(f'{k}={v}' for k, v in cfg.items() if k not in SD) or 'base'}-{steps}"


@pytest.mark.parametrize("entry", TABLE, ids=[_id(e) for e in TABLE])
def test_step_for_step_matches_diffusers(entry):
    name, cfg, steps = entry
    ours, theirs = S.scheduler_class(name)(**cfg), _theirs(name)(**cfg)
    run_pair(ours, theirs, steps=steps, guidance=7.5)


@pytest.mark.parametrize("name", sorted({e[0] for e in TABLE}))
def test_without_guidance(name):
    run_pair(S.scheduler_class(name)(**SD), _theirs(name)(**SD), steps=9, seed=4)


@pytest.mark.parametrize("name,set_kwargs", [
    ("EulerDiscreteScheduler", {"timesteps": [999, 700, 650, 400, 100, 3]}),
    ("EulerDiscreteScheduler", {"sigmas": [14.0, 8.0, 3.0, 1.0, 0.3, 0.0]}),
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 800, 500, 300, 120, 20]}),
])
def test_custom_schedules(name, set_kwargs):
    run_pair(S.scheduler_class(name)(**SD), _theirs(name)(**SD), set_kwargs=set_kwargs)
