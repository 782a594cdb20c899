"""Random-argument tests of every public op except group_norm (issue 22): attention, guided_step,
sampler_update, dynamic_threshold.

Each op's argument space (dtype, shape, memory layout, options, special values: NaN, +-inf, zero
coefficients, non-positive scales, low-rank masks...) is sampled pairwise: every pair of levels of any
two factors appears in at least one case (greedy all-pairs, seeded), and each case draws its values
from its own seed. Every case runs on every backend available here (reference, cpu = the C++
extension, sdpa, triton under TRITON_INTERPRET=1; cuda with a GPU) and checks, against a float64
formula written here (not the reference backend):
  - NaN exactly where the formula has NaN, +-inf where it has +-inf, close elsewhere;
  - every input bit-identical after the call (its whole storage, views included);
  - every output a fresh tensor (no storage shared with an input or another output), contiguous,
    of the input's dtype.
Invalid arguments raise the same error, naming the argument, on every backend; the compiled entry
points refuse bad tensors with a Python error (never a crash).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import diffkern
from diffkern import _ext
from diffkern.kernels import reference as kref
from diffkern.kernels import reference_multistep as kref_ms
from tests.conftest import HAS_CUDA

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NAN, INF = float("nan"), float("inf")
KERNEL_DTYPES = (F32, F16, BF16)
# tolerance relative to the magnitude of the terms: final rounding of the output dtype, x4 for the
# float32 arithmetic on the way (a few operations, each rounded) and the rounding of the inputs' effect
REL = {F64: 1e-9, F32: 4e-6, F16: 4e-3, BF16: 3e-2}


def pairwise(factors, seed, pool=60):
    """Greedy all-pairs covering array: a list of dicts such that any two levels of any two factors
    appear together in at least one dict. Seeded, so the case list is the same on every run."""
    rng = random.Random(seed)
    names = list(factors)
    todo = {(a, i, b, j) for a, b in itertools.combinations(range(len(names)), 2)
            for i in range(len(factors[names[a]])) for j in range(len(factors[names[b]]))}
    cases = []
    while todo:
        a, i, b, j = min(todo)  # seed each case with one uncovered pair, then fill greedily
        best, best_gain = None, -1
        for _ in range(pool):
            pick = [rng.randrange(len(factors[n])) for n in names]
            pick[a], pick[b] = i, j
            gain = sum((p, pick[p], q, pick[q]) in todo for p, q in itertools.combinations(range(len(names)), 2))
            if gain > best_gain:
                best, best_gain = pick, gain
        todo -= {(p, best[p], q, best[q]) for p, q in itertools.combinations(range(len(names)), 2)}
        cases.append({n: factors[n][k] for n, k in zip(names, best)})
    return cases


def _device(backend):
    return torch.device("cuda") if backend == "cuda" or (backend == "triton" and HAS_CUDA) else torch.device("cpu")


def _require(op, backend):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons(op).get(backend)
    if why:
        pytest.fail(f"{op} backend {backend} unavailable here: {why}")


def _params(op, cases, kernel_cases=None):
    """(backend, case) params; the Triton interpreter (slow) runs the first kernel_cases cases."""
    out = []
    for b in ("reference", "sdpa", "cpu", "triton", "cuda"):
        if b == "sdpa" and op != "attention" or b in ("cpu", "cuda") and op == "attention":
            continue
        n = len(cases) if b != "triton" or kernel_cases is None else kernel_cases
        marks = (pytest.mark.cuda,) if b == "cuda" else ()
        out += [pytest.param(b, k, id=f"{b}-{k}", marks=marks) for k in range(n)]
    return out


# ---------------------------------------------------------------------------------------------
# layouts, special values, input / output integrity

def with_layout(t, kind, gen):
    """t's values in a tensor of the given memory layout: contiguous, transposed (last two dims
    swapped in memory), strided (every other element of a larger buffer) or offset (storage offset)."""
    if kind == "contiguous" or t.dim() == 0:
        return t.clone()
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        big = torch.randn(t.shape[:-1] + (2 * t.shape[-1] + 1,), generator=gen).to(t.dtype)
        v = big[..., 1::2]
        v.copy_(t)
        return v
    buf = torch.randn(t.numel() + 5, generator=gen).to(t.dtype)
    v = buf[5:].view(t.shape)
    v.copy_(t)
    return v


def poke(t, value, gen, count=1):
    """Writes value at count random positions of t (in place), returns the flat indices."""
    if t.numel() == 0:
        return []
    idx = torch.randint(0, t.numel(), (count,), generator=gen).tolist()
    for i in idx:
        pos = torch.unravel_index(torch.tensor(i), t.shape)
        t[tuple(int(p) for p in pos)] = value
    return idx


def _bytes(t):
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def snapshot(tensors):
    return [(t, _bytes(t).clone()) for t in tensors if isinstance(t, torch.Tensor)]


def assert_untouched(snaps):
    for i, (t, before) in enumerate(snaps):
        assert torch.equal(_bytes(t), before), f"input {i} (shape {tuple(t.shape)}) was modified"


def assert_fresh(outs, inputs, dtype, shape, contiguous=True):
    ins = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel()}
    seen = set()
    for i, o in enumerate(outs):
        assert o.dtype == dtype, f"output {i}: dtype {o.dtype}, expected {dtype}"
        assert tuple(o.shape) == tuple(shape), f"output {i}: shape {tuple(o.shape)}, expected {tuple(shape)}"
        assert o.is_contiguous() or not contiguous, f"output {i} is not contiguous"
        if o.numel() == 0:
            continue
        p = o.untyped_storage().data_ptr()
        assert p not in ins, f"output {i} shares storage with an input"
        assert p not in seen, f"output {i} shares storage with another output"
        seen.add(p)


def assert_matches(got, want, bound, what):
    """NaN where want is NaN, the same infinities, |got - want| <= bound elsewhere (float64 want)."""
    g = got.detach().cpu().double()
    nan_w, nan_g = torch.isnan(want), torch.isnan(g)
    assert torch.equal(nan_g, nan_w), (
        f"{what}: NaN at {int(nan_g.sum())} elements, expected {int(nan_w.sum())} "
        f"(missing {int((nan_w & ~nan_g).sum())}, extra {int((nan_g & ~nan_w).sum())})")
    inf_w = torch.isinf(want)
    assert torch.equal(torch.isinf(g), inf_w) and torch.equal(g[inf_w], want[inf_w]), f"{what}: infinities differ"
    fin = torch.isfinite(want)
    bound = torch.as_tensor(bound, dtype=F64).expand(want.shape)
    err = (g - want).abs()
    bad = fin & ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, max error {err[fin].max().item():.3g} "
                           f"(bound there {bound[bad][0].item():.3g})")


def _finite_max(*ts):
    m = 0.0
    for t in ts:
        if t is not None and t.numel():
            a = t.detach().double().abs()
            a = a[torch.isfinite(a)]
            if a.numel():
                m = max(m, a.max().item())
    return m


# ---------------------------------------------------------------------------------------------
# float64 formulas (independent of diffkern.kernels.reference)

def sort_quantile(mag, q):
    """Per row of (B, n) float64 |x|: position q (n - 1) between the order statistics floor / ceil,
    v_lo + w (v_hi - v_lo) (v_lo when w = 0 or both equal), NaN for a row with a NaN. By full sort."""
    n = mag.shape[1]
    v = mag.sort(dim=1).values
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    w = pos - lo
    a, b = v[:, lo], v[:, hi]
    s = a.clone() if w == 0 else torch.where(a == b, a, a + w * (b - a))
    return torch.where(torch.isnan(mag).any(1), NAN, s)


def threshold_formula(v, percentile, max_value):
    """(B, ...) float64 -> dynamic thresholding of each sample."""
    B = v.shape[0]
    a = v.reshape(B, -1)
    s = sort_quantile(a.abs(), percentile).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s[:, None]
    return (torch.maximum(torch.minimum(a, s), -s) / s).reshape(v.shape)


def clamp_keep_nan(v, lo, hi):
    return torch.where(torch.isnan(v), v, torch.minimum(torch.maximum(v, torch.as_tensor(lo, dtype=v.dtype)),
                                                        torch.as_tensor(hi, dtype=v.dtype)))


def drop_zero(c, t):
    """c * t, or exactly 0 where c == 0 (a zero coefficient drops its term, even for inf / NaN t)."""
    return torch.where(c == 0, torch.zeros((), dtype=t.dtype), c * t)


# ---------------------------------------------------------------------------------------------
# attention

ATT = pairwise(dict(
    dtype=[F32, F16, BF16, F64],
    shape=[(1, 1, 1, 7, 4), (2, 3, 5, 7, 8), (1, 2, 9, 11, 1), (2, 1, 6, 0, 4), (1, 2, 4, 3, 5)],  # B H Sq Sk D
    prefix=[None, 0, 3],
    causal=[False, True],
    bias=[None, "float4", "float1", "float2", "bool2", "bool_pad", "neginf", "scalar", "big"],
    scale=[None, 0.0, -0.6, 1.7, 2],
    layout=["contiguous", "transposed", "strided", "offset"],
    special=["none", "nan_q", "nan_kv", "nan_bias"],
), seed=22) + [  # pinned cases (issue 22): pairs do not guarantee these triples
    dict(dtype=F32, shape=(2, 3, 5, 7, 8), prefix=None, causal=True, bias=None, scale=0.0, layout="contiguous",
         special="none"),
    dict(dtype=F16, shape=(1, 2, 9, 11, 1), prefix=None, causal=True, bias=None, scale=-0.6, layout="transposed",
         special="nan_q"),
    dict(dtype=F32, shape=(2, 3, 5, 7, 8), prefix=None, causal=False, bias="float1", scale=None,
         layout="contiguous", special="none"),
    dict(dtype=BF16, shape=(1, 2, 4, 3, 5), prefix=3, causal=True, bias="scalar", scale=1.7, layout="strided",
         special="none"),
    dict(dtype=F32, shape=(2, 1, 6, 0, 4), prefix=None, causal=True, bias="bool2", scale=0.0, layout="offset",
         special="none"),
    dict(dtype=F16, shape=(2, 3, 5, 7, 8), prefix=3, causal=True, bias="big", scale=None, layout="contiguous",
         special="nan_bias"),
    # no key at all: every row is fully masked, 0 even for a NaN q (a size-1 bias key dim is no key)
    dict(dtype=F16, shape=(2, 1, 6, 0, 4), prefix=0, causal=False, bias="scalar", scale=2, layout="contiguous",
         special="nan_q"),
    dict(dtype=F64, shape=(2, 1, 6, 0, 4), prefix=None, causal=False, bias=None, scale=1.7, layout="strided",
         special="nan_q"),
]


def attention_case(k, device):
    c = ATT[k]
    gen = torch.Generator().manual_seed(1000 + k)
    B, H, Sq, Sk, D = c["shape"]
    Sp = c["prefix"]
    dt = c["dtype"]
    rnd = lambda *s: torch.randn(s, generator=gen, dtype=F64)
    q, kk, v = rnd(B, H, Sq, D), rnd(B, H, Sk, D), rnd(B, H, Sk, D)
    prefix = None if Sp is None else (rnd(B, H, Sp, D), rnd(B, H, Sp, D))
    L = Sk + (Sp or 0)
    kind = c["bias"]
    bias = {None: None, "float4": rnd(B, H, Sq, L), "float1": rnd(L), "float2": rnd(Sq, L),
            "bool2": torch.rand(Sq, L, generator=gen) > 0.3, "bool_pad": torch.rand(B, 1, 1, L, generator=gen) > 0.3,
            "neginf": rnd(B, 1, Sq, L), "scalar": torch.tensor(0.25, dtype=F64), "big": None}[kind]
    if kind == "big":  # per-row constant 2^17 (+-) on a bias exact in float32: wider than float16
        bias = (torch.where(torch.rand(B, 1, Sq, 1, generator=gen) < 0.5, -1.0, 1.0) * 2.0 ** 17
                + (rnd(B, 1, Sq, L) * 64).round() / 64).to(F32)
    if kind == "neginf":  # -inf entries mask keys; one row fully masked
        bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.3, -INF)
        if Sq > 1:
            bias[..., 0, :] = -INF
    special = c["special"]
    if special == "nan_q":
        poke(q, NAN, gen)
    elif special == "nan_kv" and not c["causal"] and kind is None and Sk > 0:
        poke(kk if k % 2 else v, NAN, gen)  # every row sees every key: the NaN reaches them all
    elif special == "nan_bias" and bias is not None and bias.is_floating_point() and bias.dim() > 0:
        poke(bias, NAN, gen)
    if dt != F64:
        q, kk, v = q.to(dt), kk.to(dt), v.to(dt)
        prefix = None if prefix is None else (prefix[0].to(dt), prefix[1].to(dt))
        if bias is not None and bias.is_floating_point() and k % 3 == 0 and kind != "big":
            bias = bias.to(dt)  # a bias in the inputs' dtype, or float64 beside 16-bit inputs
    lay = lambda t: with_layout(t, c["layout"], gen).to(device)
    q, kk, v = lay(q), lay(kk), lay(v)
    prefix = None if prefix is None else (lay(prefix[0]), lay(prefix[1]))
    bias = None if bias is None else bias.to(device)
    return c, q, kk, v, prefix, bias


def attention_formula(q, k, v, bias, causal, scale, prefix, work=F64):
    """softmax(q k^T scale + bias) v over the visible keys; rows with none visible are 0."""
    od = q.dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    Sp = 0
    if prefix is not None:
        Sp = prefix[0].shape[2]
        k, v = torch.cat([prefix[0].to(work), k], 2), torch.cat([prefix[1].to(work), v], 2)
    D, Sq, L = q.shape[-1], q.shape[2], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    i, j = torch.arange(Sq)[:, None], torch.arange(L)[None, :]
    keep = torch.ones(Sq, L, dtype=torch.bool) if not causal else (j < Sp) | (j - Sp <= i)
    keep = keep.to(s.device)
    if bias is not None:
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            keep = keep & ~torch.isneginf(bias)
            s = s + bias.to(work)
    keep = keep.expand(s.shape)
    s = s.masked_fill(~keep, -INF)
    dead = ~keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(~keep, 0.0)
    out = (p @ v).masked_fill(dead, 0.0)
    return out if work == F64 else out.to(od)


@pytest.mark.parametrize("backend,k", _params("attention", ATT, kernel_cases=len(ATT)))
def test_attention_random_arguments(backend, k):
    _require("attention", backend)
    device = _device(backend)
    c, q, kk, v, prefix, bias = attention_case(k, device)
    kw = dict(attn_bias=bias, causal=c["causal"], scale=c["scale"], kv_prefix=prefix)
    ins = [q, kk, v, bias] + list(prefix or ())
    if backend == "triton" and (q.dtype == F64):
        with pytest.raises(ValueError, match="cannot run this call: .*dtype"):
            diffkern.ops.attention(q, kk, v, backend=backend, **kw)
        return
    snaps = snapshot(ins)
    out = diffkern.ops.attention(q, kk, v, backend=backend, **kw)
    assert_untouched(snaps)
    assert_fresh([out], ins, q.dtype, q.shape, contiguous=False)  # attention promises no layout
    cpu = lambda t: None if t is None else t.cpu()
    args = (cpu(q), cpu(kk), cpu(v), cpu(bias), c["causal"], c["scale"],
            None if prefix is None else (cpu(prefix[0]), cpu(prefix[1])))
    want = attention_formula(*args)
    # relative criterion: at most 2x the error of plain PyTorch in the inputs' dtype (float32 for
    # float64 inputs' noise floor), plus the dtype's rounding of the largest value
    plain = attention_formula(*args, work=q.dtype if q.dtype != F64 else F32).double()
    fin = torch.isfinite(want) & torch.isfinite(plain)
    plain_err = (plain - want).abs()[fin].max().item() if fin.any() else 0.0
    vmax = _finite_max(v, *(prefix or ()))
    assert_matches(out, want, 2 * plain_err + 2 * REL[q.dtype] * (1 + vmax), f"attention[{backend}] case {k} {c}")


# ---------------------------------------------------------------------------------------------
# guided_step

GS = pairwise(dict(
    dtype=[F32, F16, BF16, F64],
    shape=[(1, 1), (3, 2, 5), (2, 3, 4, 3), (1, 2, 2, 3, 2)],
    prediction_type=["epsilon", "sample", "v_prediction"],
    clip=["none", "static", "dynamic"],
    variance=["fixed", "learned_range"],
    uncond=[False, True],
    noise=["none", "tensor", "seed"],
    eps_from_clipped=[True, False],
    layout=["contiguous", "transposed", "strided", "offset"],
    special=["none", "nan_x", "inf_model", "zero_eps_s1m0", "zero_sigma_inf_noise", "big_x0", "inf_x", "nan_coeff",
             "nan_uncond"],
), seed=23) + [  # pinned: x0 = pred must not alias model_output; quantiles next to inf
    dict(dtype=F32, shape=(2, 3, 4, 3), prediction_type="sample", clip="none", variance="fixed", uncond=False,
         noise="none", eps_from_clipped=True, layout="contiguous", special="none"),
    dict(dtype=F64, shape=(3, 2, 5), prediction_type="sample", clip="none", variance="fixed", uncond=False,
         noise="tensor", eps_from_clipped=False, layout="contiguous", special="none"),
    dict(dtype=F32, shape=(2, 3, 4, 3), prediction_type="epsilon", clip="dynamic", variance="fixed", uncond=True,
         noise="none", eps_from_clipped=True, layout="contiguous", special="inf_model", kw=dict(dynamic_percentile=1.0,
                                                                                               dynamic_max_value=1e4)),
]


def guided_step_case(k, device):
    c = GS[k]
    gen = torch.Generator().manual_seed(2000 + k)
    dt, shape = c["dtype"], c["shape"]
    B, C = shape[:2]
    learned = c["variance"] == "learned_range"
    mshape = (B, 2 * C if learned else C) + shape[2:]
    rnd = lambda s: torch.randn(s, generator=gen, dtype=F64)
    x, m = rnd(shape), rnd(mshape)
    if learned:
        m[:, C:] = torch.rand(m[:, C:].shape, generator=gen, dtype=F64) * 2 - 1
    u = rnd(mshape) if c["uncond"] else None
    noise = rnd(shape) if c["noise"] == "tensor" else None
    sa = torch.rand(B, generator=gen, dtype=F64) * 0.9 + 0.1
    coeffs = torch.stack([sa, (1 - sa ** 2).sqrt(), rnd(B), rnd(B), rnd(B), rnd(B).abs()]
                         + ([-rnd(B).abs() - 3, -rnd(B).abs()] if learned else []), 1)
    sp = c["special"]
    if sp == "nan_x":
        poke(x, NAN, gen)
    elif sp == "inf_model":
        poke(m[:, :C], INF if k % 2 else -INF, gen)
    elif sp == "zero_eps_s1m0":  # s1m = 0: eps = (x - sa x0) / 0 is inf / NaN, dropped by c_eps = 0
        coeffs[:, 0], coeffs[:, 1], coeffs[:, 4] = 1.0, 0.0, 0.0
    elif sp == "zero_sigma_inf_noise" and noise is not None:
        poke(noise, INF, gen)  # sigma follows IEEE: 0 * inf = NaN
        coeffs[:, 5] = 0.0
    elif sp == "big_x0":
        x = x * 40
    elif sp == "inf_x":
        poke(x, -INF if k % 2 else INF, gen)
    elif sp == "nan_coeff":  # a NaN coefficient poisons its sample (c_eps NaN is no zero: kept)
        coeffs[B - 1, [2, 3, 4, 5][k % 4]] = NAN
    elif sp == "nan_uncond" and u is not None:
        poke(u, NAN, gen)
    kw = dict(prediction_type=c["prediction_type"], clip=c["clip"], variance=c["variance"],
              eps_from_clipped=c["eps_from_clipped"], guidance_scale=[1.0, 0.0, 7.5, -1.5][k % 4],
              clip_range=[1.0, 0.0, 2.5][k % 3], dynamic_percentile=[0.995, 0.0, 1.0, 0.5, 0.37][k % 5],
              dynamic_max_value=[1.0, 1.6, 1e4][k % 3])
    if c["noise"] == "seed":
        kw.update(noise_seed=12345 + k, noise_offset=[0, 7, 2 ** 40][k % 3])
    kw.update(c.get("kw", {}))
    lay = lambda t: None if t is None else with_layout(t.to(dt), c["layout"], gen).to(device)
    x, m, u, noise = lay(x), lay(m), lay(u), lay(noise)
    coeffs = coeffs.to(F32 if k % 2 else F64)
    coeffs = (coeffs.t().contiguous().t() if k % 3 == 0 else coeffs).to(device)
    return c, x, m, u, noise, coeffs, kw


def guided_step_formula(x, m, coeffs, u, noise, kw):
    x, m, co = x.double(), m.double(), coeffs.double()
    C = x.shape[1]
    pred = m[:, :C]
    if u is not None:
        un = u.double()[:, :C]
        pred = un + kw["guidance_scale"] * (pred - un)
    bc = lambda j: co[:, j].reshape((-1,) + (1,) * (x.dim() - 1))
    sa, s1m, c_x0, c_xt, c_eps, sigma = (bc(j) for j in range(6))
    pt, clip = kw["prediction_type"], kw["clip"]
    x0 = (x - s1m * pred) / sa if pt == "epsilon" else pred if pt == "sample" else sa * x - s1m * pred
    raw = x0
    if clip == "static":
        x0 = clamp_keep_nan(x0, -kw["clip_range"], kw["clip_range"])
    elif clip == "dynamic":
        x0 = threshold_formula(x0, kw["dynamic_percentile"], kw["dynamic_max_value"])
    if pt == "sample" or (clip != "none" and kw["eps_from_clipped"]):
        eps = (x - sa * (x0 if kw["eps_from_clipped"] else raw)) / s1m
    elif pt == "epsilon":
        eps = pred
    else:
        eps = sa * pred + s1m * x
    prev = c_x0 * x0 + c_xt * x + drop_zero(c_eps, eps)
    if kw.get("noise_seed") is not None:
        noise = kref.seeded_noise(x.shape, kw["noise_seed"], kw["noise_offset"], dtype=F64)
    if noise is not None:
        if m.shape[1] == 2 * C:
            f = (m[:, C:] + 1) / 2
            std = torch.exp(0.5 * (f * bc(7) + (1 - f) * bc(6)))
        else:
            std = sigma
        prev = prev + std * noise.double()
    # magnitude of the terms, for the tolerance
    fx, fp = x.abs().nan_to_num(0, 0, 0), pred.abs().nan_to_num(0, 0, 0)  # non-finite: the masks judge
    mag = (fx + s1m.abs() * fp) / sa.abs() + fx + fp
    fc = lambda t: t.abs().nan_to_num(0, 0, 0)
    mag = mag * (1 + fc(c_x0) + fc(c_xt) + fc(c_eps) + 1 / s1m.abs().clamp(min=1e-3)) + 10
    return prev, x0, mag


@pytest.mark.parametrize("backend,k", _params("guided_step", GS, kernel_cases=len(GS)))
def test_guided_step_random_arguments(backend, k):
    _require("guided_step", backend)
    device = _device(backend)
    c, x, m, u, noise, coeffs, kw = guided_step_case(k, device)
    ins = [x, m, u, noise, coeffs]
    if backend != "reference" and x.dtype == F64:
        with pytest.raises(ValueError, match="cannot run this call: .*dtype"):
            diffkern.ops.guided_step(x, m, coeffs, uncond_output=u, noise=noise, backend=backend, **kw)
        return
    snaps = snapshot(ins)
    outs = diffkern.ops.guided_step(x, m, coeffs, uncond_output=u, noise=noise, backend=backend, **kw)
    assert_untouched(snaps)
    assert_fresh(outs, ins, x.dtype, x.shape)
    prev, x0, mag = guided_step_formula(*(t if t is None else t.cpu() for t in (x, m, coeffs, u, noise)), kw)
    tol = REL[x.dtype] * (mag + prev.abs().nan_to_num(0, 0, 0))
    if kw.get("noise_seed") is not None:
        tol = tol + 1e-5 * (1 + coeffs.cpu().double().abs().nan_to_num(0, 0, 0).max())  # float32 log / cos of the noise
    assert_matches(outs[1], x0, REL[x.dtype] * mag, f"guided_step[{backend}] x0, case {k} {c} {kw}")
    assert_matches(outs[0], prev, tol, f"guided_step[{backend}] prev, case {k} {c} {kw}")


# ---------------------------------------------------------------------------------------------
# sampler_update

SU = pairwise(dict(
    dtype=[F32, F16, BF16, F64],
    shape=[(1,), (3, 5), (2, 3, 4, 3), (2, 1, 7)],
    H=[0, 1, 3, 6],
    aux=[False, True],
    clip=["none", "static", "dynamic"],
    uncond=[False, True],
    noise=[False, True],
    layout=["contiguous", "transposed", "strided", "offset"],
    special=["none", "nan_model", "inf_model", "inf_history_zero_coeff", "inf_noise_zero_std", "nan_x", "zeros",
             "nan_coeff", "inf_x"],
), seed=24) + [  # pinned (issue 22 item 3 and its class): NaN through each clip, inf d, c_j = 0 with d_j != 0
    dict(dtype=F32, shape=(2, 3, 4, 3), H=3, aux=True, clip=clip, uncond=True, noise=True, layout="contiguous",
         special=special, kw=dict(dynamic_percentile=p))
    for clip, special, p in (("static", "nan_x", 0.9), ("dynamic", "nan_model", 0.9), ("none", "inf_history_zero_coeff", 0.9),
                             ("dynamic", "inf_model", 1.0), ("dynamic", "inf_model", 0.0))
]


def sampler_update_case(k, device):
    c = SU[k]
    gen = torch.Generator().manual_seed(3000 + k)
    dt, shape, H, aux = c["dtype"], c["shape"], c["H"], c["aux"]
    B = shape[0]
    rnd = lambda s: torch.randn(s, generator=gen, dtype=F64)
    x, m = rnd(shape), rnd(shape)
    u = rnd(shape) if c["uncond"] else None
    noise = rnd(shape) if c["noise"] else None
    hist = [rnd(shape) for _ in range(H)]
    K, ix = kref_ms.layout(H, aux)
    coeffs = rnd((B, K))
    coeffs[torch.rand(B, K, generator=gen) < 0.2] = 0.0  # zero coefficients drop their terms
    sp = c["special"]
    if sp == "nan_model":
        poke(m, NAN, gen)
    elif sp == "inf_history_zero_coeff" and H:
        j = k % H
        poke(hist[j], INF if k % 2 else -INF, gen, count=2)
        coeffs[:, 4 + j] = 0.0  # c_j = 0 drops the term in out; a non-zero d_j (aux) keeps it there
        if aux:
            coeffs[:, ix["d"].start + j] = 0.7
    elif sp == "inf_noise_zero_std" and noise is not None:
        poke(noise, INF, gen)
        coeffs[:, ix["std"]] = 0.0
    elif sp == "nan_x":
        poke(x, NAN, gen)
    elif sp == "inf_model":
        poke(m, INF if k % 2 else -INF, gen)
    elif sp == "zeros":
        x.zero_()
        m.zero_()
    elif sp == "nan_coeff":
        coeffs[B - 1, k % K] = NAN
    elif sp == "inf_x":
        poke(x, INF, gen)
    kw = dict(clip=c["clip"], aux=aux, guidance_scale=[1.0, 0.0, 5.0, -2.0][k % 4],
              clip_range=[1.0, 0.0, 0.7][k % 3], dynamic_percentile=[0.995, 1.0, 0.0, 0.5, 0.61][k % 5],
              dynamic_max_value=[1.0, 1.4, 50.0][k % 3])
    kw.update(c.get("kw", {}))
    lay = lambda t: None if t is None else with_layout(t.to(dt), c["layout"], gen).to(device)
    x, m, u, noise = lay(x), lay(m), lay(u), lay(noise)
    hist = [lay(h) for h in hist]
    coeffs = coeffs.to(F32 if k % 2 else F64)
    coeffs = (coeffs.t().contiguous().t() if k % 3 == 0 else coeffs).to(device)
    return c, x, m, u, noise, hist, coeffs, kw


def sampler_update_formula(x, m, coeffs, hist, u, noise, kw):
    H = len(hist)
    x, m, co = x.double(), m.double(), coeffs.double()
    bc = lambda j: co[:, j].reshape((-1,) + (1,) * (x.dim() - 1))
    pred = m
    if u is not None:
        un = u.double()
        pred = un + kw["guidance_scale"] * (pred - un)
    d = bc(0) * x + bc(1) * pred
    mag = (bc(0).abs() * x.abs() + bc(1).abs() * pred.abs())
    if kw["clip"] == "static":
        d = clamp_keep_nan(d, -kw["clip_range"], kw["clip_range"])
    elif kw["clip"] == "dynamic":
        d = threshold_formula(d, kw["dynamic_percentile"], kw["dynamic_max_value"])
    hs = [h.double() for h in hist]
    out = bc(2) * x + bc(3) * d
    for j, h in enumerate(hs):
        out = out + drop_zero(bc(4 + j), h)
    if noise is not None:
        out = out + drop_zero(bc(4 + H), noise.double())
    res = [out, d]
    if kw["aux"]:
        a2 = bc(5 + H) * x + bc(6 + H) * d
        for j, h in enumerate(hs):
            a2 = a2 + drop_zero(bc(7 + H + j), h)
        res.append(a2)
    fin = lambda t: t.abs().nan_to_num(0, 0, 0)
    big = sum(fin(h) for h in hs) + fin(x) + fin(pred) + (0 if noise is None else fin(noise.double()))
    mag = (mag.nan_to_num(0, 0, 0) + big + 1) * (1 + co.abs().nan_to_num(0, 0, 0).amax(1).reshape(bc(0).shape))
    return res, mag


@pytest.mark.parametrize("backend,k", _params("sampler_update", SU, kernel_cases=len(SU)))
def test_sampler_update_random_arguments(backend, k):
    _require("sampler_update", backend)
    device = _device(backend)
    c, x, m, u, noise, hist, coeffs, kw = sampler_update_case(k, device)
    ins = [x, m, u, noise, coeffs] + hist
    if backend != "reference" and x.dtype == F64:
        with pytest.raises(ValueError, match="cannot run this call: .*dtype"):
            diffkern.ops.sampler_update(x, m, coeffs, hist, uncond_output=u, noise=noise, backend=backend, **kw)
        return
    snaps = snapshot(ins)
    outs = diffkern.ops.sampler_update(x, m, coeffs, hist, uncond_output=u, noise=noise, backend=backend, **kw)
    assert_untouched(snaps)
    assert_fresh(outs, ins, x.dtype, x.shape)
    cpu = lambda t: None if t is None else t.cpu()
    want, mag = sampler_update_formula(cpu(x), cpu(m), cpu(coeffs), [h.cpu() for h in hist], cpu(u), cpu(noise), kw)
    assert len(outs) == len(want)
    for name, got, w in zip(("out", "d", "aux"), outs, want):
        assert_matches(got, w, REL[x.dtype] * (mag + w.abs().nan_to_num(0, 0, 0)),
                       f"sampler_update[{backend}] {name}, case {k} {c} {kw}")


# ---------------------------------------------------------------------------------------------
# dynamic_threshold

DT = pairwise(dict(
    dtype=[F32, F16, BF16, F64],
    shape=[(1, 1), (3, 2), (2, 7), (2, 3, 4, 5), (1, 61)],
    percentile=[0.0, 1.0, 0.5, 0.995, "random"],
    max_value=[None, 1.0, 2.5, 1e30],
    layout=["contiguous", "transposed", "strided", "offset"],
    special=["none", "inf", "neg_inf", "nan", "zeros", "ties", "small", "all_inf", "neg_zero"],
), seed=25) + [  # pinned (issue 22 item 5): [1, inf] at weights 0 and >= 0.5 (torch.lerp's other branch)
    dict(dtype=dt, shape=(1, 2), percentile=p, max_value=None, layout="contiguous", special="one_inf")
    for dt, p in ((F32, 0.0), (F64, 0.0), (F32, 0.75), (F16, 0.25))
]


def dynamic_threshold_case(k, device):
    c = DT[k]
    gen = torch.Generator().manual_seed(4000 + k)
    x = torch.randn(c["shape"], generator=gen, dtype=F64) * 3
    sp = c["special"]
    if sp in ("inf", "neg_inf", "nan"):
        poke(x, {"inf": INF, "neg_inf": -INF, "nan": NAN}[sp], gen, count=1 + k % 2)
    elif sp == "zeros":
        x.zero_()
    elif sp == "ties":
        x = x.round()
    elif sp == "small":
        x = x * 0.1
    elif sp == "all_inf":
        x = torch.where(x < 0, -INF, INF)
    elif sp == "neg_zero":
        x = torch.where(x < 0, -0.0, x)
    elif sp == "one_inf":
        x = torch.tensor([[1.0, INF]], dtype=F64)
    p = c["percentile"]
    if p == "random":
        p = torch.rand(1, generator=gen).item()
    x = with_layout(x.to(c["dtype"]), c["layout"], gen).to(device)
    return c, x, p, c["max_value"]


@pytest.mark.parametrize("backend,k", _params("dynamic_threshold", DT, kernel_cases=len(DT)))
def test_dynamic_threshold_random_arguments(backend, k):
    _require("dynamic_threshold", backend)
    device = _device(backend)
    c, x, p, mv = dynamic_threshold_case(k, device)
    if backend != "reference" and x.dtype == F64:
        with pytest.raises(ValueError, match="cannot run this call: .*dtype"):
            diffkern.ops.dynamic_threshold(x, p, mv, backend=backend)
        return
    snaps = snapshot([x])
    y = diffkern.ops.dynamic_threshold(x, p, mv, backend=backend)
    assert_untouched(snaps)
    assert_fresh([y], [x], x.dtype, x.shape)
    want = threshold_formula(x.cpu().double(), p, mv)
    # |y| <= 1: output rounding of the dtype; float32 threshold and division in the kernels
    assert_matches(y, want, REL[x.dtype] * 2 + (2e-7 if x.dtype == F64 else 0), f"dynamic_threshold[{backend}] case {k} {c} p={p}")


# ---------------------------------------------------------------------------------------------
# invalid arguments: the same error on every backend, naming the argument


def _att_args():
    q = torch.randn(1, 2, 3, 4)
    return dict(q=q, k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 4))


ATT_BAD = [
    (dict(scale=NAN), ValueError, "scale"),
    (dict(scale=INF), ValueError, "scale"),
    (dict(scale=-INF), ValueError, "scale"),
    (dict(scale="1"), TypeError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(attn_bias=torch.zeros(1, 1, 1, 1, 5)), ValueError, "attn_bias"),
    (dict(attn_bias=torch.zeros(4)), ValueError, "attn_bias"),
    (dict(attn_bias=torch.zeros(5, dtype=torch.int64)), TypeError, "attn_bias"),
    (dict(attn_bias=[0.0] * 5), TypeError, "attn_bias"),
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q"),
    (dict(q=torch.randn(1, 2, 3, 4, dtype=F64)), TypeError, "k"),
    (dict(q=torch.ones(1, 2, 3, 4, dtype=torch.int32)), TypeError, "q"),
    (dict(v=torch.randn(1, 2, 6, 4)), ValueError, "same length"),
    (dict(kv_prefix=torch.randn(1, 2, 3, 4)), TypeError, "kv_prefix"),
    (dict(kv_prefix=(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5))), ValueError, "kv_prefix[1]"),
]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("bad,exc,name", ATT_BAD, ids=[f"att{i}" for i in range(len(ATT_BAD))])
def test_attention_invalid_arguments(backend, bad, exc, name):
    a = _att_args()
    kw = {k: v for k, v in bad.items() if k not in a}
    a.update({k: v for k, v in bad.items() if k in a})
    with pytest.raises(exc, match=f"attention: .*{name}" if "[" not in name else "kv_prefix\\[1\\]"):
        diffkern.ops.attention(a["q"], a["k"], a["v"], backend=backend, **kw)


def _gs_args(learned=False):
    x = torch.randn(2, 3, 4)
    m = torch.randn(2, 6 if learned else 3, 4)
    return x, m, torch.rand(2, 8 if learned else 6) + 0.1


GS_BAD = [
    (dict(clip="dynamic", dynamic_max_value=0.5), ValueError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_max_value=0.0), ValueError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_max_value=-2.0), ValueError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_max_value=NAN), TypeError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_percentile=1.5), ValueError, "dynamic_percentile"),
    (dict(clip="dynamic", dynamic_percentile=-0.1), ValueError, "dynamic_percentile"),
    (dict(clip="static", clip_range=-1.0), ValueError, "clip_range"),
    (dict(clip="static", clip_range=INF), TypeError, "clip_range"),
    (dict(guidance_scale=NAN), TypeError, "guidance_scale"),
    (dict(guidance_scale=None), TypeError, "guidance_scale"),
    (dict(clip="Dynamic"), ValueError, "clip"),
    (dict(noise=torch.randn(2, 3, 5)), ValueError, "noise"),
    (dict(noise=torch.randn(2, 3, 4, dtype=F64)), TypeError, "noise"),
    (dict(uncond_output=torch.randn(2, 3)), ValueError, "uncond_output"),
    (dict(coeffs=torch.rand(2, 5)), ValueError, "coeffs"),
    (dict(coeffs=torch.ones(2, 6, dtype=torch.int64)), TypeError, "coeffs"),
    (dict(coeffs=torch.rand(2, 6, dtype=F16)), TypeError, "coeffs"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad,exc,name", GS_BAD, ids=[f"gs{i}" for i in range(len(GS_BAD))])
def test_guided_step_invalid_arguments(backend, bad, exc, name):
    x, m, co = _gs_args()
    bad = dict(bad)
    co = bad.pop("coeffs", co)
    with pytest.raises(exc, match=f"guided_step: {name}"):
        diffkern.ops.guided_step(x, m, co, backend=backend, **bad)


GS_EXTRA_BAD = [
    (dict(prediction_type="eps"), ValueError, "prediction_type"),
    (dict(variance="learned"), ValueError, "variance"),
    (dict(noise_seed=-1), ValueError, "noise_seed"),
    (dict(noise_seed=1.5), TypeError, "noise_seed"),
    (dict(noise_seed=3, noise=torch.randn(2, 3, 4)), ValueError, "noise"),
    (dict(noise_offset=-1), ValueError, "noise_offset"),
    (dict(eps_from_clipped=1), TypeError, "eps_from_clipped"),
]


@pytest.mark.parametrize("bad,exc,name", GS_EXTRA_BAD, ids=[f"gsx{i}" for i in range(len(GS_EXTRA_BAD))])
def test_guided_step_invalid_arguments_more(bad, exc, name):
    x, m, co = _gs_args()
    for backend in ("reference", "cpu"):
        with pytest.raises(exc, match=f"guided_step: .*{name}"):
            diffkern.ops.guided_step(x, m, co, backend=backend, **bad)


def test_dynamic_max_value_below_one_is_fine_without_dynamic_clip():
    """The bound is only read by clip='dynamic' (as clip_range only by 'static'): other clips take any
    finite value, so configs that carry diffusers' sample_max_value untouched keep working."""
    x, m, co = _gs_args()
    a = diffkern.ops.guided_step(x, m, co, clip="static", dynamic_max_value=0.5, backend="cpu")
    b = diffkern.ops.guided_step(x, m, co, clip="static", backend="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a, b))


SU_BAD = [
    (dict(clip="dynamic", dynamic_max_value=0.5), ValueError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_max_value=0.0), ValueError, "dynamic_max_value"),
    (dict(clip="dynamic", dynamic_percentile=2.0), ValueError, "dynamic_percentile"),
    (dict(clip="static", clip_range=-0.5), ValueError, "clip_range"),
    (dict(guidance_scale=INF), TypeError, "guidance_scale"),
    (dict(aux=1), TypeError, "aux"),
    (dict(clip=None), ValueError, "clip"),
    (dict(history=[torch.randn(2, 3, 4)] * 7), ValueError, "history"),
    (dict(history=[torch.randn(2, 3, 5)]), ValueError, "history\\[0\\]"),
    (dict(history=torch.randn(2, 3, 4)), TypeError, "history"),
    (dict(coeffs=torch.rand(2, 6)), ValueError, "coeffs"),
    (dict(coeffs=torch.rand(2, 5, dtype=BF16)), TypeError, "coeffs"),
    (dict(noise=torch.randn(2, 3, 4, dtype=F16)), TypeError, "noise"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad,exc,name", SU_BAD, ids=[f"su{i}" for i in range(len(SU_BAD))])
def test_sampler_update_invalid_arguments(backend, bad, exc, name):
    x, m = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    bad = dict(bad)
    hist = bad.pop("history", [])
    co = bad.pop("coeffs", torch.rand(2, 5))
    with pytest.raises(exc, match=f"sampler_update: .*{name}"):
        diffkern.ops.sampler_update(x, m, co, hist, backend=backend, **bad)


DT_BAD = [
    (dict(percentile=-0.1), ValueError, "percentile"),
    (dict(percentile=NAN), ValueError, "percentile"),
    (dict(percentile="0.9"), TypeError, "percentile"),
    (dict(max_value=0.5), ValueError, "max_value"),
    (dict(max_value=NAN), ValueError, "max_value"),
    (dict(max_value=True), TypeError, "max_value"),
    (dict(x=torch.ones(3, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.tensor(1.0)), ValueError, "x"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bad,exc,name", DT_BAD, ids=[f"dt{i}" for i in range(len(DT_BAD))])
def test_dynamic_threshold_invalid_arguments(backend, bad, exc, name):
    kw = dict(x=torch.randn(2, 5), percentile=0.9, max_value=None)
    kw.update(bad)
    with pytest.raises(exc, match=f"dynamic_threshold: {name}"):
        diffkern.ops.dynamic_threshold(kw["x"], kw["percentile"], kw["max_value"], backend=backend)


# ---------------------------------------------------------------------------------------------
# the compiled entry points validate their tensors themselves (a Python error, never a crash)

def _ext_cases():
    x = torch.randn(2, 3, 4)
    f = lambda *s, **k: torch.randn(*s, **k)
    out = lambda: (torch.empty_like(x), torch.empty_like(x))
    gs = lambda **kw: ("guided_step_forward", dict(dict(
        x=x, m=x, u=None, noise=None, coeffs=torch.rand(2, 6), prev=out()[0], x0=out()[1], thresholds=None,
        abs_out=None, pred=0, clip=0, learned=False, g=1.0, clip_range=1.0, seed=None, offset=0, efc=True), **kw))
    su = lambda **kw: ("sampler_update_forward", dict(dict(
        x=x, m=x, u=None, noise=None, hist=[], coeffs=torch.rand(2, 5), out=out()[0], d=out()[1], aux=None,
        thresholds=None, abs_out=None, clip=0, g=1.0, clip_range=1.0), **kw))
    dt = lambda **kw: ("dynamic_threshold_forward", dict(dict(x=f(2, 5), p=0.5, mv=None, out=None, apply=True), **kw))
    return [
        gs(m=f(2, 3, 5)), gs(coeffs=torch.rand(2, 5)), gs(coeffs=torch.rand(2, 6, dtype=F64)),
        gs(prev=torch.empty(2, 3, 4, dtype=F16)), gs(x=x.transpose(1, 2).contiguous().transpose(1, 2)),
        gs(clip=2), gs(clip=2, thresholds=torch.ones(3)), gs(clip=7), gs(pred=-1), gs(seed=-5),
        gs(abs_out=torch.empty(2, 11)), gs(x=torch.randn(2, 3, 4, dtype=F64)), gs(x=torch.randn(5)),
        gs(u=f(2, 3)), gs(offset=-1), gs(x0=torch.empty(2, 12)[:, ::2].reshape(2, 3, 2)),
        su(hist=[x] * 7), su(hist=[f(2, 3, 5)]), su(coeffs=torch.rand(2, 6)), su(clip=2), su(clip=3),
        su(aux=torch.empty(2, 3, 3)), su(x=torch.tensor(1.0)), su(x=torch.ones(2, 3, 4, dtype=torch.int32)),
        su(d=torch.empty(2, 4, 3).transpose(1, 2)), su(thresholds=torch.ones(2, 1), clip=2),
        dt(p=1.5), dt(p=NAN), dt(mv=0.5), dt(mv=NAN), dt(x=torch.tensor(1.0)), dt(x=torch.ones(3, dtype=torch.int64)),
        dt(x=f(2, 6)[:, ::2]), dt(out=torch.empty(2, 4)), dt(out=torch.empty(2, 5), apply=False),
    ]


def _call_ext(ext, name, a):
    if name == "guided_step_forward":
        return ext.guided_step_forward(a["x"], a["m"], a["u"], a["noise"], a["coeffs"], a["prev"], a["x0"],
                                       a["thresholds"], a["abs_out"], a["pred"], a["clip"], a["learned"], a["g"],
                                       a["clip_range"], a["seed"], a["offset"], a["efc"])
    if name == "sampler_update_forward":
        return ext.sampler_update_forward(a["x"], a["m"], a["u"], a["noise"], a["hist"], a["coeffs"], a["out"],
                                          a["d"], a["aux"], a["thresholds"], a["abs_out"], a["clip"], a["g"],
                                          a["clip_range"])
    return ext.dynamic_threshold_forward(a["x"], a["p"], a["mv"], a["out"], a["apply"])


def test_compiled_entry_points_validate_inputs():
    ext = _ext.extension()
    assert ext is not None, _ext.extension_error()
    for i, (name, a) in enumerate(_ext_cases()):
        with pytest.raises((ValueError, TypeError)) as info:
            _call_ext(ext, name, a)
        assert name.split("_forward")[0] in str(info.value), f"case {i}: {info.value}"


def test_kernel_backends_declare_their_launch_limits():
    """A kernel backend refuses (with its reason) what its launch cannot take, instead of accepting the
    call and failing in the launcher or with dynamic_threshold's message."""
    from diffkern.ops.guided_step import launch_limits

    many = torch.empty(65536, 1, device="meta")
    assert any("65535 samples" in r for r in launch_limits(many, "none", True))
    assert launch_limits(many, "none", False) == []  # the CPU kernels and the interpreter have no grid limit
    long = torch.empty(1, 2 ** 32, device="meta")
    assert any("2^32" in r for r in launch_limits(long, "dynamic", True))
    assert launch_limits(long, "static", True) == []
