"""UnCLIPScheduler against diffusers' UnCLIPScheduler, step for step (Karlo's spacing, explicit
prev_timestep with the recomputed beta, both variance types, guidance fused)."""

import pytest
import torch

from diffkern.schedulers import UnCLIPScheduler

from ._helpers import model

# coefficients are computed as diffusers computes them (float32 tensor ops), so only the fused
# op's own float32 rounding differs
ATOL, RTOL = 1e-5, 1e-5

diffusers = pytest.importorskip("diffusers")


def _run(cfg, steps, *, explicit_prev=True, guidance=None, shape=(2, 3, 8, 8), seed=0):
    ours, theirs = UnCLIPScheduler(**cfg), diffusers.UnCLIPScheduler(**cfg)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    learned = cfg.get("variance_type") == "learned_range"
    x1 = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7))
    x2 = x1.clone()
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    ts = ours.timesteps.tolist()
    for i, t in enumerate(ts):
        prev = (ts[i + 1] if i + 1 < len(ts) else -1) if explicit_prev else None
        kw = {"prev_timestep": prev} if explicit_prev else {}
        c1 = model(x1, t, channels=2 if learned else None)
        c2 = model(x2, t, channels=2 if learned else None)
        if guidance is None:
            o1 = ours.step(c1, t, x1, generator=g1, **kw)
            o2 = theirs.step(c2, t, x2, generator=g2, **kw)
        else:
            u1 = model(x1, t, channels=2 if learned else None, scale=0.6)
            u2 = model(x2, t, channels=2 if learned else None, scale=0.6)
            o1 = ours.step(c1, t, x1, generator=g1, uncond_output=u1, guidance_scale=guidance, **kw)
            C = shape[1]  # the unCLIP pipelines' combine: guidance on the prediction, variance from cond
            pred = u2[:, :C] + guidance * (c2[:, :C] - u2[:, :C])
            o2 = theirs.step(torch.cat([pred, c2[:, C:]], 1), t, x2, generator=g2, **kw)
        for name in ("pred_original_sample", "prev_sample"):
            torch.testing.assert_close(getattr(o1, name), getattr(o2, name), atol=ATOL, rtol=RTOL,
                                       msg=lambda m, t=t, n=name: f"{n} at t={t}: {m}")
        x1, x2 = o1.prev_sample, o2.prev_sample


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("clip", [{"clip_sample": True}, {"clip_sample": False},
                                  {"clip_sample": True, "clip_sample_range": 0.7}])
def test_trajectory_matches_diffusers(variance_type, prediction_type, clip):
    _run(dict(variance_type=variance_type, prediction_type=prediction_type, **clip), steps=9)


@pytest.mark.parametrize("explicit_prev", [True, False])
def test_prev_timestep_none_steps_by_one(explicit_prev):
    # prev_timestep=None: one training step back with the table beta (diffusers' default)
    _run({"num_train_timesteps": 50, "variance_type": "learned_range"}, steps=50, explicit_prev=explicit_prev)


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "learned_range"])
def test_guidance_fused(variance_type):
    _run({"variance_type": variance_type}, steps=7, guidance=4.0)


def test_config_contract(tmp_path):
    theirs = diffusers.UnCLIPScheduler(variance_type="learned_range", clip_sample_range=5.0)
    ours = UnCLIPScheduler.from_config(theirs.config)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(theirs.config)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod)
    ours.save_pretrained(tmp_path / "s")
    back = diffusers.UnCLIPScheduler.from_pretrained(tmp_path / "s")
    assert back.config.variance_type == "learned_range" and back.config.clip_sample_range == 5.0
    assert public(UnCLIPScheduler.from_pretrained(tmp_path, subfolder="s").config) == public(ours.config)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t))
    out = ours.step(torch.zeros(1, 6, 2, 2), 0, torch.zeros(1, 3, 2, 2), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2


@pytest.mark.parametrize("config", [{"variance_type": "fixed_large"}, {"prediction_type": "v_prediction"}])
def test_unfused_config_runs_diffusers_step(config):
    # what diffusers' step does with these (here: raise its own error), ours does too
    ours, theirs = UnCLIPScheduler(**config), diffusers.UnCLIPScheduler(**config)
    assert ours.fallback_reason() is not None
    x = torch.randn(1, 3, 2, 2)
    results = []
    for s in (ours, theirs):
        try:
            results.append(s.step(torch.tanh(x), 500, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        except Exception as e:  # noqa: BLE001
            results.append(type(e))
    if isinstance(results[0], torch.Tensor):
        torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
    else:
        assert results[0] is results[1]


def test_bad_step_input():
    s = UnCLIPScheduler(variance_type="learned_range")
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="2\\*C"):
        s.step(torch.zeros(1, 5, 2, 2), 999, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="prev_timestep"):
        s.step(torch.zeros(1, 6, 2, 2), 500, torch.zeros(1, 3, 2, 2), prev_timestep=600)
