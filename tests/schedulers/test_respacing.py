"""GLIDE / improved-DDPM respacing against the improved-DDPM formulas written out in float64."""

import math

import pytest
import torch

from diffkern.schedulers import DDIMScheduler, DDPMScheduler, respaced_betas, space_timesteps

from ._helpers import model


def test_space_timesteps_known_values():
    assert space_timesteps(10, "2,3") == {0, 4, 5, 7, 9}
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, "4") == {0, 333, 666, 999}
    assert space_timesteps(300, [10, 10, 10]) == space_timesteps(300, "10,10,10")
    assert len(space_timesteps(300, "10,10,10")) == 30
    fast = space_timesteps(1000, "fast27")
    assert len(fast) == 27 and 997 in fast and 999 not in fast
    assert fast - {997} == space_timesteps(1000, "10,10,3,2,2") - {999}
    # 1001 % 3 = 2: the first two sections get one more step; round(166.5) = 166 (Python rounds half to even)
    assert space_timesteps(1001, "3,3,3") == {0, 166, 333, 334, 500, 667, 668, 834, 1000}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("ddim7", "integer stride"),
        ("5,20", "cannot divide"),
        ("fast30", "fast27"),
        ("ten", "comma-separated"),
    ],
)
def test_space_timesteps_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(10 if spec != "fast30" else 1000, spec)


def test_respaced_betas_keep_alphas_cumprod():
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    kept = sorted(space_timesteps(1000, "25"))
    betas, tmap = respaced_betas(acp, kept)
    assert tmap == kept
    last, expected = 1.0, []
    for i, a in enumerate(acp.tolist()):  # improved-DDPM SpacedDiffusion.__init__, verbatim logic
        if i in kept:
            expected.append(1 - a / last)
            last = a
    torch.testing.assert_close(betas, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), acp[kept])


def _iddpm_tables(base_betas, spec):
    """improved-DDPM GaussianDiffusion tables for SpacedDiffusion(space_timesteps(T, spec), base_betas)."""
    acp_full = torch.cumprod(1 - base_betas, 0)
    kept = sorted(space_timesteps(len(base_betas), spec))
    betas, _ = respaced_betas(acp_full, kept)
    alphas = 1 - betas
    acp = torch.cumprod(alphas, 0)
    acp_prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    return {
        "kept": kept,
        "betas": betas,
        "acp": acp,
        "acp_prev": acp_prev,
        "log_var_small": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
        "log_var_large": torch.log(torch.cat([post_var[1:2], betas[1:]])),
        "coef1": betas * acp_prev.sqrt() / (1 - acp),
        "coef2": (1 - acp_prev) * alphas.sqrt() / (1 - acp),
    }


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("spec", ["50", "10,10,5", "fast27"])
def test_ddpm_respaced_matches_iddpm_p_sample(spec, variance_type):
    base = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    tab = _iddpm_tables(base, spec)
    sched = DDPMScheduler(trained_betas=base.tolist(), timestep_respacing=spec, variance_type=variance_type)
    sched.set_timesteps()
    assert sched.timesteps.tolist() == tab["kept"][::-1]
    learned = variance_type == "learned_range"
    x_ref = x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x_ref.double()
    gen = torch.Generator().manual_seed(1)
    for i in reversed(range(len(tab["kept"]))):
        t = tab["kept"][i]  # the model sees the original timestep (timestep_map)
        noise = torch.randn(x.shape, generator=gen)
        out = model(x, t, channels=2 if learned else None)
        ours = sched.step(out, t, x, variance_noise=noise)
        out_ref = model(x_ref, t, channels=2 if learned else None)
        eps = out_ref[:, :3]
        acp = tab["acp"][i].item()
        x0 = (math.sqrt(1 / acp) * x_ref - math.sqrt(1 / acp - 1) * eps).clamp(-1, 1)
        mean = tab["coef1"][i] * x0 + tab["coef2"][i] * x_ref
        if learned:
            frac = (out_ref[:, 3:] + 1) / 2
            log_var = frac * math.log(tab["betas"][i]) + (1 - frac) * tab["log_var_small"][i]
        else:
            log_var = tab["log_var_small" if variance_type == "fixed_small" else "log_var_large"][i]
        x_ref = mean + (i != 0) * torch.exp(0.5 * torch.as_tensor(log_var)) * noise.double()
        torch.testing.assert_close(ours.pred_original_sample.double(), x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.prev_sample.double(), x_ref, atol=1e-4, rtol=1e-4)
        x = ours.prev_sample


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spec", ["ddim25", "fast27"])
def test_ddim_respaced_matches_iddpm_ddim_sample(spec, eta):
    base = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    tab = _iddpm_tables(base, spec)
    sched = DDIMScheduler(trained_betas=base.tolist(), timestep_respacing=spec)
    sched.set_timesteps()
    assert sched.timesteps.tolist() == tab["kept"][::-1]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x.double()
    gen = torch.Generator().manual_seed(1)
    for i in reversed(range(len(tab["kept"]))):
        t = tab["kept"][i]
        noise = torch.randn(x.shape, generator=gen)
        ours = sched.step(model(x, t), t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise)
        acp, acp_prev = tab["acp"][i].item(), tab["acp_prev"][i].item()
        x0 = (math.sqrt(1 / acp) * x_ref - math.sqrt(1 / acp - 1) * model(x_ref, t)).clamp(-1, 1)
        eps = (math.sqrt(1 / acp) * x_ref - x0) / math.sqrt(1 / acp - 1)  # _predict_eps_from_xstart
        sigma = eta * math.sqrt((1 - acp_prev) / (1 - acp)) * math.sqrt(1 - acp / acp_prev)
        x_ref = (
            x0 * math.sqrt(acp_prev)
            + math.sqrt(1 - acp_prev - sigma**2) * eps
            + (i != 0) * sigma * noise.double()
        )
        torch.testing.assert_close(ours.prev_sample.double(), x_ref, atol=1e-4, rtol=1e-4)
        x = ours.prev_sample


def test_respaced_set_timesteps_count_mismatch_raises():
    s = DDPMScheduler(timestep_respacing="ddim50")
    s.set_timesteps(50)
    assert len(s.timesteps) == 50
    with pytest.raises(ValueError, match="keeps 50 steps"):
        s.set_timesteps(20)
    with pytest.raises(ValueError, match="integer stride"):
        DDIMScheduler(num_train_timesteps=10, timestep_respacing="ddim7")
