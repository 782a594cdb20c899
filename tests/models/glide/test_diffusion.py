"""GLIDE diffusion: schedules, respacing and samplers against float64 computations from the equations.

The reference below is written from improved DDPM's equations (numpy float64), independently of the
code under test; the samplers run at float64 so only the schedulers' float32 step coefficients
(rounded once) separate them.
"""

import math

import numpy as np
import pytest
import torch

from diffkern.models.glide.diffusion import (
    GaussianDiffusion,
    create_gaussian_diffusion,
    get_named_beta_schedule,
    guided_model_fn,
)
from diffkern.schedulers import space_timesteps

F64 = torch.float64


def ref_betas(name, T):
    if name == "linear":
        return np.linspace(0.1 / T, 20.0 / T, T)
    ab = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(T, dtype=np.float64)
    return np.minimum(1 - ab((i + 1) / T) / ab(i / T), 0.999)


def ref_respaced(betas, kept):
    acp = np.cumprod(1 - betas)
    out, last = [], 1.0
    for k in sorted(kept):
        out.append(1 - acp[k] / last)
        last = acp[k]
    return np.array(out)


class Ref:
    """p_sample / ddim_sample of improved DDPM with learned-range variance, float64 numpy."""

    def __init__(self, betas):
        self.b = betas
        self.acp = np.cumprod(1 - betas)
        self.acp_prev = np.append(1.0, self.acp[:-1])
        self.pv = betas * (1 - self.acp_prev) / (1 - self.acp)
        self.plvc = np.log(np.append(self.pv[1], self.pv[1:]))

    def x0(self, x, i, eps, clip, denoised_fn=None):
        x0 = np.sqrt(1 / self.acp[i]) * x - np.sqrt(1 / self.acp[i] - 1) * eps
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return np.clip(x0, -1, 1) if clip else x0

    def p_sample(self, x, i, out, noise, clip=True, grad=None, denoised_fn=None):
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        x0 = self.x0(x, i, eps, clip, denoised_fn)
        mean = (self.b[i] * np.sqrt(self.acp_prev[i]) / (1 - self.acp[i]) * x0
                + (1 - self.acp_prev[i]) * np.sqrt(1 - self.b[i]) / (1 - self.acp[i]) * x)
        frac = (v + 1) / 2
        log_var = frac * np.log(self.b[i]) + (1 - frac) * self.plvc[i]
        if grad is not None:
            mean = mean + np.exp(log_var) * grad
        return mean + (i != 0) * np.exp(0.5 * log_var) * noise

    def ddim_sample(self, x, i, out, eta=0.0, noise=0.0, clip=True, grad=None):
        C = x.shape[1]
        a, a_prev = self.acp[i], self.acp_prev[i]
        x0 = self.x0(x, i, out[:, :C], clip)
        eps = (np.sqrt(1 / a) * x - x0) / np.sqrt(1 / a - 1)
        if grad is not None:
            eps = eps - np.sqrt(1 - a) * grad
            x0 = np.sqrt(1 / a) * x - np.sqrt(1 / a - 1) * eps
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        return x0 * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sigma**2) * eps + (i != 0) * sigma * noise


def linear_model(seed=0, C=3):
    """A smooth deterministic stand-in: eps and v linear in x, varying with t; (B, 2C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2 * C, C, generator=g, dtype=F64) * 0.5
    b = torch.randn(2 * C, generator=g, dtype=F64) * 0.3

    def model_fn(x, t):
        s = (t.to(F64) / 1000).view(-1, 1, 1, 1)
        out = torch.einsum("oc,bchw->bohw", W, x.to(F64)) * (1 + s) + b.view(1, -1, 1, 1)
        out[:, C:] = torch.tanh(out[:, C:])  # variance values in [-1, 1]
        return out.to(x.dtype)

    return model_fn


def draws(seed, shape, n):
    """x_T then n step noises, drawn as the samplers draw them from one generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) for _ in range(n + 1)]


# -- schedules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 250, 37])
def test_named_schedules(name, T):
    betas = get_named_beta_schedule(name, T)
    assert betas.dtype == F64
    np.testing.assert_allclose(betas.numpy(), ref_betas(name, T), rtol=1e-13, atol=0)


def test_schedule_facts():
    lin = get_named_beta_schedule("linear", 500)
    assert math.isclose(lin[0].item(), 2e-4) and math.isclose(lin[-1].item(), 0.04)  # scaled by 1000 / 500
    assert get_named_beta_schedule("squaredcos_cap_v2", 1000)[-1].item() == 0.999  # the cap


@pytest.mark.parametrize("name,T,respacing", [
    ("squaredcos_cap_v2", 1000, "100"), ("linear", 1000, "fast27"), ("squaredcos_cap_v2", 1000, "ddim25"),
    ("linear", 300, "10,15,20"), ("squaredcos_cap_v2", 37, ""),
])
def test_respaced_betas(name, T, respacing):
    d = create_gaussian_diffusion(T, name, respacing)
    kept = sorted(space_timesteps(T, respacing or [T]))
    assert d.timestep_map.tolist() == kept and d.original_num_steps == T
    betas = ref_betas(name, T)
    np.testing.assert_allclose(d.betas.numpy(), ref_respaced(betas, kept), rtol=1e-12, atol=0)
    # the respaced process keeps the original alphas_cumprod at the kept timesteps (1e-10: the last
    # cosine beta is 0.999, so 1 - beta loses 3 digits before the product)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - betas)[kept], rtol=1e-10)


def test_bad_options():
    with pytest.raises(ValueError, match="noise_schedule"):
        create_gaussian_diffusion(1000, "cosine", "")
    with pytest.raises(ValueError, match="num_diffusion_timesteps"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(ValueError):
        create_gaussian_diffusion(1000, "linear", "fast30")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.1, 1.5])


# -- one step -----------------------------------------------------------------------------------------

def test_learned_range_step_matches_float64_equations():
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "100")
    ref = Ref(d.betas.numpy())
    sched = d.ddpm_scheduler()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=F64)
    out = torch.cat([torch.randn(2, 3, 5, 7, generator=g, dtype=F64),
                     torch.rand(2, 3, 5, 7, generator=g, dtype=F64) * 2 - 1], 1)
    noise = torch.randn(2, 3, 5, 7, generator=g, dtype=F64)
    for i in (99, 50, 1, 0):
        got = sched.step(out, i, x, variance_noise=noise if i else None).prev_sample
        want = ref.p_sample(x.numpy(), i, out.numpy(), noise.numpy())
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)  # float32 step coefficients


# -- loops --------------------------------------------------------------------------------------------

def _ddpm_reference(d, model_fn, shape, seed, **kw):
    ref = Ref(d.betas.numpy())
    noises = draws(seed, shape, d.num_timesteps - 1)
    x = noises[0]
    for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
        out = model_fn(x, d.timestep_map[i].expand(shape[0]))
        step_noise = noises[n + 1].numpy() if i else 0.0
        x = torch.from_numpy(ref.p_sample(x.numpy(), i, out.numpy(), step_noise, **kw))
    return x


def test_p_sample_loop_matches_reference():
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "8")
    model_fn = linear_model()
    shape = (2, 3, 4, 5)
    got = d.p_sample_loop(model_fn, shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = _ddpm_reference(d, model_fn, shape, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_combines_eps_channels_only():
    d = create_gaussian_diffusion(1000, "linear", "6")
    cond_fn_, uncond_fn_ = linear_model(0), linear_model(1)
    shape, s = (1, 3, 4, 4), 4.0

    def pair(x, t):
        return cond_fn_(x, t), uncond_fn_(x, t)

    def combined(x, t):  # what GLIDE's notebook model_fn returns for the conditional half
        c, u = pair(x, t)
        return torch.cat([u[:, :3] + s * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)

    run = lambda fn, **kw: d.p_sample_loop(fn, shape, generator=torch.Generator().manual_seed(0),  # noqa: E731
                                           dtype=F64, **kw)
    guided = run(pair, guidance_scale=s)
    torch.testing.assert_close(guided, run(combined), rtol=1e-6, atol=1e-6)

    def other_uncond_variance(x, t):
        c, u = pair(x, t)
        return c, torch.cat([u[:, :3], -u[:, 3:]], 1)

    torch.testing.assert_close(run(other_uncond_variance, guidance_scale=s), guided, rtol=0, atol=0)


def test_guided_model_fn_batches_one_call():
    calls = []

    def model(x, t, tokens=None, mask=None):
        calls.append((x.shape[0], tokens.shape[0]))
        return torch.cat([x, x], 1) * tokens[:, :1, None, None]

    tokens = torch.tensor([[2.0], [3.0]])  # cond row, then uncond row
    x = torch.randn(1, 3, 2, 2)
    cond, uncond = guided_model_fn(model, {"tokens": tokens, "mask": None})(x, torch.tensor([5]))
    assert calls == [(2, 2)]
    torch.testing.assert_close(cond, 2 * torch.cat([x, x], 1))
    torch.testing.assert_close(uncond, 3 * torch.cat([x, x], 1))


def test_ddpm_cond_fn_shifts_mean_by_variance_times_grad():
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "6")
    model_fn, shape = linear_model(), (1, 3, 4, 4)
    cond_fn = lambda x, t: torch.sin(x) * (t.to(x.dtype).view(-1, 1, 1, 1) / 500)  # noqa: E731
    got = d.p_sample_loop(model_fn, shape, cond_fn=cond_fn, generator=torch.Generator().manual_seed(2),
                          dtype=F64)
    ref, noises = Ref(d.betas.numpy()), draws(2, shape, d.num_timesteps - 1)
    x = noises[0]
    for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
        t = d.timestep_map[i].expand(1)
        grad = cond_fn(x, t).numpy()
        x = torch.from_numpy(ref.p_sample(x.numpy(), i, model_fn(x, t).numpy(),
                                          noises[n + 1].numpy() if i else 0.0, grad=grad))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_cond_fn_shifts_score(eta):
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "ddim100")  # 10 steps
    model_fn, shape = linear_model(), (1, 3, 4, 4)
    cond_fn = lambda x, t: torch.cos(x) * 0.3  # noqa: E731
    got = d.ddim_sample_loop(model_fn, shape, eta=eta, cond_fn=cond_fn,
                             generator=torch.Generator().manual_seed(4), dtype=F64)
    ref, noises = Ref(d.betas.numpy()), draws(4, shape, d.num_timesteps)
    x = noises[0]
    for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
        t = d.timestep_map[i].expand(1)
        x = torch.from_numpy(ref.ddim_sample(x.numpy(), i, model_fn(x, t).numpy(), eta, noises[n + 1].numpy(),
                                             grad=cond_fn(x, t).numpy()))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cond_fn_shifts_the_guided_step(kind):
    """Classifier-free guidance and cond_fn together (CLIP + free guidance in GLIDE's pipeline): the
    step of the guided eps (variance from the conditional half), then cond_fn's shift: of the mean
    (DDPM) or of the score (DDIM)."""
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "6")
    cond_m, uncond_m, s, shape = linear_model(0), linear_model(1), 3.0, (2, 3, 4, 4)
    cond_fn = lambda x, t: torch.sin(x) * (t.to(x.dtype).view(-1, 1, 1, 1) / 500)  # noqa: E731
    loop = d.p_sample_loop if kind == "ddpm" else d.ddim_sample_loop
    got = loop(lambda x, t: (cond_m(x, t), uncond_m(x, t)), shape, guidance_scale=s, cond_fn=cond_fn,
               generator=torch.Generator().manual_seed(8), dtype=F64)
    ref, noises = Ref(d.betas.numpy()), draws(8, shape, d.num_timesteps)
    x = noises[0]
    for n, i in enumerate(range(d.num_timesteps - 1, -1, -1)):
        t = d.timestep_map[i].expand(shape[0])
        c, u = cond_m(x, t).numpy(), uncond_m(x, t).numpy()
        out = np.concatenate([u[:, :3] + s * (c[:, :3] - u[:, :3]), c[:, 3:]], 1)
        grad = cond_fn(x, t).numpy()
        if kind == "ddpm":
            x = ref.p_sample(x.numpy(), i, out, noises[n + 1].numpy() if i else 0.0, grad=grad)
        else:
            x = ref.ddim_sample(x.numpy(), i, out, grad=grad)
        x = torch.from_numpy(x)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_ddim_loop_without_cond_fn_matches_reference():
    d = create_gaussian_diffusion(1000, "linear", "fast27")
    model_fn, shape = linear_model(), (1, 3, 3, 3)
    xT = draws(5, shape, 0)[0] * 0.997
    got = d.ddim_sample_loop(model_fn, shape, noise=xT, dtype=F64)
    ref, x = Ref(d.betas.numpy()), xT
    for i in range(d.num_timesteps - 1, -1, -1):
        x = torch.from_numpy(ref.ddim_sample(x.numpy(), i, model_fn(x, d.timestep_map[i].expand(1)).numpy()))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_denoised_fn_replaces_known_region_before_clipping():
    d = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "5")
    model_fn, shape = linear_model(), (1, 3, 4, 4)
    known = torch.linspace(-1.5, 1.5, 48, dtype=F64).view(shape)
    keep = torch.zeros(1, 1, 4, 4, dtype=F64)
    keep[..., :2] = 1
    denoised = lambda x0: x0 * (1 - keep) + known * keep  # noqa: E731
    got = d.p_sample_loop(model_fn, shape, denoised_fn=denoised, generator=torch.Generator().manual_seed(6),
                          dtype=F64)
    np_denoised = lambda x0: x0 * (1 - keep.numpy()) + known.numpy() * keep.numpy()  # noqa: E731
    want = _ddpm_reference(d, model_fn, shape, 6, denoised_fn=np_denoised)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_round_trip():
    """DDIM inversion then DDIM sampling returns the image. The stand-in is the exact eps of
    Gaussian data N(mu, 0.25) (a well-behaved probability-flow ODE). Plain inversion is first order
    (eps taken at the step's start), so its round trip is off by O(1 / steps); the fixed-point
    iterations make each step the exact inverse of the sampler's, leaving float64 rounding."""
    steps = 100
    d = create_gaussian_diffusion(steps, "linear", "25")
    acp = torch.cumprod(1 - get_named_beta_schedule("linear", steps), 0)
    mu = torch.tensor([0.2, -0.1, 0.05], dtype=F64).view(1, 3, 1, 1)

    def model_fn(x, t):
        a = acp[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * 0.25 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    x0 = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(7), dtype=F64) * 1.6 - 0.8
    for iterations, tol in ((0, 0.3), (10, 1e-6)):
        xT = d.ddim_reverse_sample_loop(model_fn, x0, fixed_point_iterations=iterations)
        assert 0.5 < xT.std() < 1.5  # it is noise-like
        back = d.ddim_sample_loop(model_fn, x0.shape, noise=xT, clip_denoised=False, dtype=F64)
        assert (back - x0).abs().max() < tol


def test_loop_errors():
    d = create_gaussian_diffusion(1000, "linear", "3")
    with pytest.raises(ValueError, match="2\\*C"):
        d.p_sample_loop(lambda x, t: x, (1, 3, 2, 2))
    with pytest.raises(TypeError, match="cond_output, uncond_output"):
        d.p_sample_loop(linear_model(), (1, 3, 2, 2), guidance_scale=2.0)
    with pytest.raises(ValueError, match="eta"):
        d.ddim_sample_loop(linear_model(), (1, 3, 2, 2), eta=-1)
    with pytest.raises(ValueError, match="noise must have shape"):
        d.p_sample_loop(linear_model(), (1, 3, 2, 2), noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="fixed_point_iterations"):
        d.ddim_reverse_sample_loop(linear_model(), torch.zeros(1, 3, 2, 2), fixed_point_iterations=-1)
