"""DDIMScheduler and DDIMInverseScheduler against diffusers, whole trajectories step by step."""

import pytest
import torch

from diffkern.schedulers import DDIMInverseScheduler, DDIMScheduler

from ._helpers import run_pair

diffusers = pytest.importorskip("diffusers")

CLIPS = {
    "none": {"clip_sample": False},
    "static": {"clip_sample": True, "clip_sample_range": 0.8},
    "dynamic": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
}


@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_trajectory_matches_diffusers(prediction_type, clip, eta, use_clipped):
    cfg = dict(prediction_type=prediction_type, **CLIPS[clip])
    run_pair(
        DDIMScheduler(**cfg),
        diffusers.DDIMScheduler(**cfg),
        steps=30,
        step_kwargs={"eta": eta, "use_clipped_model_output": use_clipped},
        scale=1.5 if prediction_type == "sample" else 1.0,
    )


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_spacings_and_schedules(schedule, set_alpha_to_one, spacing, offset):
    cfg = {
        "beta_schedule": schedule,
        "set_alpha_to_one": set_alpha_to_one,
        "timestep_spacing": spacing,
        "steps_offset": offset,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
    }
    run_pair(DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), steps=50, seed=7, step_kwargs={"eta": 0.5})


def test_zero_snr_v_prediction():
    # eta = 0: with eta = 1 at abar_T = 0, 1 - abar_prev - sigma^2 cancels to float32 noise in diffusers
    cfg = {
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
    }
    run_pair(DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), steps=20, step_kwargs={"eta": 0.0})


def test_variance_noise_argument():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    x, vn = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = ours.timesteps[2]
    a = ours.step(torch.tanh(x), t, x, eta=0.7, variance_noise=vn).prev_sample
    b = theirs.step(torch.tanh(x), t, x, eta=0.7, variance_noise=vn).prev_sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        ours.step(torch.tanh(x), t, x, eta=0.7, variance_noise=vn, generator=torch.Generator())


def test_step_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(1, 3, 4, 4), 10, torch.zeros(1, 3, 4, 4))


def test_learned_sigma_output_is_accepted():
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x = torch.randn(1, 3, 4, 4)
    out = torch.randn(1, 6, 4, 4)
    a = s.step(out, s.timesteps[0], x).prev_sample
    torch.testing.assert_close(a, s.step(out[:, :3], s.timesteps[0], x).prev_sample)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_inverse_matches_diffusers(prediction_type, clip_sample, spacing):
    cfg = {
        "prediction_type": prediction_type,
        "clip_sample": clip_sample,
        "timestep_spacing": spacing,
        "set_alpha_to_one": False,
    }
    ours, theirs = DDIMInverseScheduler(**cfg), diffusers.DDIMInverseScheduler(**cfg)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x1 = x2 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    for t in ours.timesteps:
        o1 = ours.step(torch.tanh(x1 * 0.7), t, x1)
        o2 = theirs.step(torch.tanh(x2 * 0.7), t, x2)
        torch.testing.assert_close(o1.pred_original_sample, o2.pred_original_sample, atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(o1.prev_sample, o2.prev_sample, atol=5e-5, rtol=5e-5)
        x1, x2 = o1.prev_sample, o2.prev_sample


def test_inversion_then_sampling_round_trips():
    # eta = 0 DDIM is invertible up to the one-step eps lag; with a constant model it is exact
    inv, fwd = DDIMInverseScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    inv.set_timesteps(25)
    fwd.set_timesteps(25)
    x0 = torch.randn(1, 3, 8, 8)
    eps = torch.randn(1, 3, 8, 8)
    x = x0
    for t in inv.timesteps:
        x = inv.step(eps, t, x).prev_sample
    for t in fwd.timesteps:
        x = fwd.step(eps, t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=1e-4)
