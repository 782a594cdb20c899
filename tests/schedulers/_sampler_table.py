"""Trajectory comparison of a diffkern sampler with diffusers' of the same name: the pipeline loop
(scale_model_input, optional classifier-free guidance, step), step for step."""

import torch

# The schedule is computed as diffusers computes it; the step's coefficients in float64 and the
# update as one float32 combination, where diffusers chains float32 tensor ops. The two differ by
# float32 rounding of the step's inputs: x0 = x - sigma eps cancels |x| ~ sigma_max * 4 (60 for SD's
# schedule, 600 for the linear default's sigma_max = 157) down to O(1), so the absolute tolerance is
# 1e-5, or 1e-6 of the largest input magnitude when that is larger (~8 float32 ulps of it).
ATOL, RTOL = 1e-5, 1e-5


def _atol(*tensors):
    return max(ATOL, 1e-6 * max(float(t.abs().max()) for t in tensors))


def stand_in(x, t, scale=1.0):
    """Deterministic stand-in for a UNet at (scaled) input x and timestep t."""
    f = 0.3 + float(t) / 1000.0
    return scale * torch.tanh(x * f + 0.1)


def run_pair(ours, theirs, *, steps=None, set_kwargs=None, step_kwargs=None, guidance=None, shape=(2, 3, 8, 8),
             seed=0, check_x0=True):
    """Both schedulers along one trajectory: each step gets the same sample (ours' previous output) and
    the same model outputs, so the comparison measures one step's rounding, not the model's
    amplification of earlier differences (CFG x sigma multiplies an input difference ~100x)."""
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    step_kwargs = step_kwargs or {}
    ours.set_timesteps(**set_kwargs)
    theirs.set_timesteps(**set_kwargs)
    assert ours.timesteps.dtype == theirs.timesteps.dtype, (ours.timesteps.dtype, theirs.timesteps.dtype)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=0)
    torch.testing.assert_close(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
    x1 = x_T * ours.init_noise_sigma
    x2 = x_T * theirs.init_noise_sigma
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for i, t in enumerate(theirs.timesteps):
        t1 = ours.timesteps[i]
        i1, i2 = ours.scale_model_input(x1, t1), theirs.scale_model_input(x2, t)
        atol = _atol(x1, x2)
        torch.testing.assert_close(i1, i2, atol=atol, rtol=RTOL, msg=lambda m, i=i: f"model input {i}: {m}")
        kw1 = dict(step_kwargs)
        kw2 = dict(step_kwargs)
        if "generator" in _params(ours.step):
            kw1["generator"], kw2["generator"] = g1, g2
        if guidance is None:
            o1 = ours.step(stand_in(i1, t1), t1, x1, **kw1)
            o2 = theirs.step(stand_in(i2, t), t, x2, **kw2)
        else:
            c1, u1 = stand_in(i1, t1), stand_in(i1, t1, scale=0.5)
            c2, u2 = stand_in(i2, t), stand_in(i2, t, scale=0.5)
            o1 = ours.step(c1, t1, x1, uncond_output=u1, guidance_scale=guidance, **kw1)
            o2 = theirs.step(u2 + guidance * (c2 - u2), t, x2, **kw2)
        torch.testing.assert_close(o1.prev_sample, o2.prev_sample, atol=atol, rtol=RTOL,
                                   msg=lambda m, i=i: f"prev_sample at step {i}: {m}")
        if check_x0 and getattr(o2, "pred_original_sample", None) is not None:
            torch.testing.assert_close(o1.pred_original_sample, o2.pred_original_sample, atol=atol, rtol=RTOL,
                                       msg=lambda m, i=i: f"pred_original_sample at step {i}: {m}")
        assert len(o1.to_tuple()) == len(o2.to_tuple())
        x1 = o1.prev_sample
        x2 = x1.clone()
    return x1


def _params(fn):
    import inspect

    return inspect.signature(fn).parameters


def diffusers_lms_class():
    """diffusers' real LMSDiscreteScheduler class even without scipy: its only scipy use is
    integrate.quad of a polynomial of degree < 4, supplied here by 8-point Gauss-Legendre (exact for
    it). Everything else (sigmas, derivative history, orders) is diffusers' own code."""
    import types

    import numpy as np
    from diffusers.schedulers import scheduling_lms_discrete as mod

    if not hasattr(mod, "integrate"):
        def quad(fn, a, b, epsrel=None):
            a, b = float(a), float(b)
            nodes, weights = np.polynomial.legendre.leggauss(8)
            vals = [float(fn(0.5 * (b - a) * x + 0.5 * (b + a))) for x in nodes]
            return 0.5 * (b - a) * float(np.dot(weights, vals)), 0.0

        mod.integrate = types.SimpleNamespace(quad=quad)
    return mod.LMSDiscreteScheduler
