"""Shared pieces of the scheduler tests: the stand-in model and trajectory comparison."""

import torch

SHAPE = (2, 3, 8, 8)
# float32 against diffusers' float32: coefficients are computed in float64 here and in float32
# tensor arithmetic there. The difference is relative to the values (up to ~3e-4 absolute where
# |x0| ~ 1 / sqrt(abar_t) ~ 150 at t = 999, measured over the DDPM/DDIM grid), so rtol dominates.
ATOL, RTOL = 5e-5, 5e-5


def model(sample, t, n_train=1000, channels=None, scale=1.0):
    """Deterministic stand-in for a UNet: tanh(sample * f(t)) (x2 channels for learned variance)."""
    f = 0.3 + float(t) / n_train
    out = scale * torch.tanh(sample * f + 0.1)
    if channels == 2:
        out = torch.cat([out, torch.tanh(sample * (1.1 - f) - 0.2)], dim=1)
    return out


def run_pair(
    ours, theirs, *, steps, seed=0, channels=None, scale=1.0, step_kwargs=None, set_kwargs=None, shape=SHAPE
):
    """Run both schedulers' whole trajectories from one x_T; assert agreement at every step."""
    step_kwargs = step_kwargs or {}
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    ours.set_timesteps(**set_kwargs)
    theirs.set_timesteps(**set_kwargs)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x1, x2 = x_T.clone(), x_T.clone()
    n = ours.config.num_train_timesteps
    for t in ours.timesteps:
        o1 = ours.step(model(x1, t, n, channels, scale), t, x1, generator=g1, **step_kwargs)
        o2 = theirs.step(model(x2, t, n, channels, scale), t, x2, generator=g2, **step_kwargs)
        torch.testing.assert_close(
            o1.pred_original_sample,
            o2.pred_original_sample,
            atol=ATOL,
            rtol=RTOL,
            msg=lambda m, t=int(t): f"x0 at t={t}: {m}",
        )
        torch.testing.assert_close(
            o1.prev_sample,
            o2.prev_sample,
            atol=ATOL,
            rtol=RTOL,
            msg=lambda m, t=int(t): f"prev_sample at t={t}: {m}",
        )
        x1, x2 = o1.prev_sample, o2.prev_sample
    return x1
