"""DDPMScheduler against diffusers' DDPMScheduler, whole trajectories step by step."""

import pytest
import torch

from diffkern.schedulers import DDPMScheduler

from ._helpers import run_pair

diffusers = pytest.importorskip("diffusers")

CLIPS = {
    "none": {"clip_sample": False},
    "static": {"clip_sample": True, "clip_sample_range": 0.8},
    "dynamic": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
}


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_trajectory_matches_diffusers(prediction_type, clip, variance_type):
    cfg = dict(prediction_type=prediction_type, variance_type=variance_type, **CLIPS[clip])
    channels = 2 if variance_type == "learned_range" else None
    run_pair(
        DDPMScheduler(**cfg),
        diffusers.DDPMScheduler(**cfg),
        steps=25,
        channels=channels,
        scale=1.5 if prediction_type == "sample" else 1.0,
    )


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_spacings_and_schedules(spacing, offset, schedule):
    cfg = {
        "beta_schedule": schedule,
        "timestep_spacing": spacing,
        "steps_offset": offset,
        "beta_start": 0.00085,
        "beta_end": 0.012,
    }
    run_pair(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), steps=30, seed=3)


def test_full_chain_few_train_steps():
    # no set_timesteps count: every training step, as diffusers' default timesteps
    cfg = {"num_train_timesteps": 40, "prediction_type": "v_prediction", "clip_sample": False}
    run_pair(
        DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), steps=40, set_kwargs={"num_inference_steps": 40}
    )


def test_custom_timesteps():
    ts = [999, 800, 650, 400, 399, 100, 20, 0]
    run_pair(DDPMScheduler(), diffusers.DDPMScheduler(), steps=None, set_kwargs={"timesteps": ts})


def test_trained_betas_and_zero_snr():
    betas = torch.linspace(1e-4, 0.03, 500).tolist()
    cfg = {
        "num_train_timesteps": 500,
        "trained_betas": betas,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    }
    run_pair(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), steps=20)


def test_generator_list_matches_diffusers():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8)
    t = ours.timesteps[3]
    eps = torch.tanh(x)
    a = ours.step(eps, t, x, generator=gens()).prev_sample
    b = theirs.step(eps, t, x, generator=gens()).prev_sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "learned"])
def test_unfused_variance_runs_diffusers_step(variance_type):
    # outside the fused op: diffusers' own step, after the guidance combine a pipeline would do
    ours, theirs = DDPMScheduler(variance_type=variance_type), diffusers.DDPMScheduler(variance_type=variance_type)
    assert ours.fallback_reason() == f"variance_type={variance_type!r}"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    C = 6 if variance_type == "learned" else 3  # "learned": predicted variance in channels C..2C
    c, u = torch.rand(2, C, 4, 4, generator=g) + 0.1, torch.rand(2, C, 4, 4, generator=g) + 0.1
    for s in (ours, theirs):
        s.set_timesteps(10)
    t = ours.timesteps[3]
    a = ours.step(c, t, x, generator=torch.Generator().manual_seed(1), uncond_output=u, guidance_scale=2.0)
    guided = torch.cat([u[:, :3] + 2.0 * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)
    b = theirs.step(guided, t, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=0, rtol=0, equal_nan=True)  # NaN: fixed_large_log
    assert type(a) is type(b)


def test_bad_inputs_raise():
    s = DDPMScheduler()
    with pytest.raises(ValueError, match="cannot be larger"):
        s.set_timesteps(2000)
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="respacing"):
        DDPMScheduler(timestep_respacing="10").set_timesteps(20)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="channels"):
        s.step(torch.zeros(1, 6, 4, 4), s.timesteps[0], torch.zeros(1, 3, 4, 4))
    s = DDPMScheduler(variance_type="learned_range")
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="2\\*C"):
        s.step(torch.zeros(1, 5, 4, 4), s.timesteps[0], torch.zeros(1, 3, 4, 4))
