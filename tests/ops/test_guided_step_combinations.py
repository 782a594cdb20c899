"""guided_step: every combination of prediction type x clip mode x variance x noise (given / seeded /
none) x uncond (given / not) x eps_from_clipped, on every backend, against an independent float64
oracle written per sample from the docstring's equations (sort-based quantile, no torch.quantile).

The combinations come from ONE table (COMBOS, an itertools.product of AXES), not hand-listed.
"""

import itertools
import math

import pytest
import torch

import diffkern
from diffkern.kernels import reference
from tests.conftest import TOL, backend_device

SHAPE = (2, 3, 5, 4)
GUIDANCE, CLIP_RANGE, PERCENTILE, MAX_VALUE, SEED, OFFSET = 3.5, 1.2, 0.9, 1.5, 1234, 77

AXES = dict(
    prediction_type=("epsilon", "sample", "v_prediction"),
    clip=("none", "static", "dynamic"),
    variance=("fixed", "learned_range"),
    noise=("none", "given", "seeded"),
    uncond=(False, True),
    eps_from_clipped=(True, False),
)
COMBOS = [dict(zip(AXES, v)) for v in itertools.product(*AXES.values())]
# The Triton interpreter costs ~0.04 s a call here: it skips the pairs that are the same kernel
# specialisation by construction (eps_from_clipped is unread without clipping; every other axis
# is a constexpr of the kernel and is enumerated in full).
TRITON_COMBOS = [c for c in COMBOS if c["clip"] != "none" or c["eps_from_clipped"]]


def _id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _cases():
    for backend, combos, marks in (("reference", COMBOS, ()), ("cpu", COMBOS, ()), ("triton", TRITON_COMBOS, ()),
                                   ("cuda", COMBOS, (pytest.mark.cuda,))):
        for c in combos:
            yield pytest.param(backend, c, id=f"{backend}-{_id(c)}", marks=marks)


def _require(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("guided_step").get(name)
    if why:
        pytest.fail(f"backend {name} unavailable: {why}")


def sort_quantile(v, q):
    """torch.quantile's 'linear' interpolation of a 1-D float64 tensor, by a full sort."""
    s = torch.sort(v).values
    pos = q * (s.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, s.numel() - 1)
    if hi == lo or pos == lo:  # no interpolation (and no 0 * inf when the top value is inf)
        return s[lo]
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def oracle(x, m, coeffs, uncond, noise, c):
    """(prev, x0) in float64, one sample at a time, from the equations of guided_step's docstring."""
    x, m, k = x.double(), m.double(), coeffs.double()
    C = x.shape[1]
    prevs, x0s = [], []
    for b in range(x.shape[0]):
        sa, s1m, c_x0, c_xt, c_eps, sigma = k[b, :6].tolist()
        xb, pred = x[b], m[b, :C]
        if uncond is not None:
            pred = uncond[b, :C].double() + GUIDANCE * (pred - uncond[b, :C].double())
        pt = c["prediction_type"]
        x0 = (xb - s1m * pred) / sa if pt == "epsilon" else pred if pt == "sample" else sa * xb - s1m * pred
        raw = x0
        if c["clip"] == "static":
            x0 = x0.clamp(-CLIP_RANGE, CLIP_RANGE)
        elif c["clip"] == "dynamic":
            s = min(max(sort_quantile(x0.abs().flatten(), PERCENTILE).item(), 1.0), MAX_VALUE)
            x0 = x0.clamp(-s, s) / s
        if pt == "sample" or c["clip"] != "none":
            eps = (xb - sa * (x0 if c["eps_from_clipped"] else raw)) / s1m
        else:
            eps = pred if pt == "epsilon" else sa * pred + s1m * xb
        prev = c_x0 * x0 + c_xt * xb + c_eps * eps
        if noise is not None:
            if c["variance"] == "learned_range":
                frac = (m[b, C:] + 1) / 2
                std = torch.exp(0.5 * (frac * k[b, 7] + (1 - frac) * k[b, 6]))
            else:
                std = sigma
            prev = prev + std * noise[b].double()
        prevs.append(prev)
        x0s.append(x0)
    return torch.stack(prevs), torch.stack(x0s)


def inputs(c, dtype, device):
    B, C = SHAPE[:2]
    learned = c["variance"] == "learned_range"
    m_shape = (B, 2 * C if learned else C) + SHAPE[2:]

    def model_out():
        m = 2 * torch.randn(m_shape)
        if learned:
            m[:, C:] = 2 * torch.rand(m[:, C:].shape) - 1
        return m.to(dtype).to(device)

    a = 0.05 + 0.9 * torch.rand(B, dtype=torch.float64)
    k = [a.sqrt(), (1 - a).sqrt(), torch.randn(B), torch.randn(B), torch.randn(B), torch.rand(B)]
    if learned:
        lo = -6 + torch.rand(B, dtype=torch.float64)
        k += [lo, lo + 2 * torch.rand(B, dtype=torch.float64)]
    coeffs = torch.stack([t.double() for t in k], 1).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return dict(sample=(2 * torch.randn(SHAPE)).to(dtype).to(device), model_output=model_out(),
                coeffs=coeffs.to(device), uncond_output=model_out() if c["uncond"] else None,
                noise=torch.randn(SHAPE).to(dtype).to(device) if c["noise"] == "given" else None)


@pytest.mark.parametrize("backend,combo", list(_cases()))
def test_combination_matches_oracle(backend, combo):
    _require(backend)
    device = backend_device(backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    inp = inputs(combo, dtype, device)
    before = {k: v.clone() for k, v in inp.items() if v is not None}
    seeded = combo["noise"] == "seeded"
    prev, x0 = diffkern.ops.guided_step(
        inp["sample"], inp["model_output"], inp["coeffs"], uncond_output=inp["uncond_output"],
        guidance_scale=GUIDANCE, prediction_type=combo["prediction_type"], clip=combo["clip"],
        clip_range=CLIP_RANGE, dynamic_percentile=PERCENTILE, dynamic_max_value=MAX_VALUE,
        variance=combo["variance"], noise=inp["noise"], noise_seed=SEED if seeded else None,
        noise_offset=OFFSET if seeded else 0, eps_from_clipped=combo["eps_from_clipped"], backend=backend)
    noise = reference.seeded_noise(SHAPE, SEED, OFFSET, dtype=torch.float64) if seeded else inp["noise"]
    cpu = {k: None if v is None else v.cpu() for k, v in inp.items()}
    want_prev, want_x0 = oracle(cpu["sample"], cpu["model_output"], cpu["coeffs"], cpu["uncond_output"],
                                None if noise is None else noise.cpu(), combo)
    atol, rtol = (1e-12, 1e-12) if dtype == torch.float64 else TOL[dtype]
    if seeded and dtype != torch.float64:
        rtol *= 4  # the in-kernel float32 Box-Muller (log, cos) against float64's: a few ulps more
    for name, got, want in (("pred_original_sample", x0, want_x0), ("prev_sample", prev, want_prev)):
        assert got.dtype == dtype and got.shape == SHAPE and got.is_contiguous(), name
        err = (got.double().cpu() - want).abs()
        # outputs are sums of several O(1) terms: the error is measured against 1 + |want|
        bound = atol + rtol * (1 + want.abs())
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g} (atol={atol}, rtol={rtol})"
    for k, v in before.items():
        assert torch.equal(inp[k], v), f"{k} was modified"
