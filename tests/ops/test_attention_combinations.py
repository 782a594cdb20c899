"""diffkern.ops.attention over every combination of its optional arguments and of which inputs require
grad, forward and backward, on every backend, against float64 autograd.

One table (AXES) generates the cases by itertools.product; invalid ones (a prefix gradient without a
prefix, a gradient for a bool or absent bias) are dropped. The CPU backends take the whole product;
the Triton interpreter takes a pairwise cover of it (tests/ops/attention_cases.py), the GPU the whole.
Criterion (ARCHITECTURE.md): the error against float64 is at most 2x plain PyTorch's error in the same
dtype, plus eps relative to the reference's magnitude.
"""

import itertools

import pytest
import torch

import diffkern
from diffkern.kernels import reference
from tests.ops.attention_cases import BACKENDS, backend_param, interpreted, pairwise
from tests.ops.test_attention import _plain, _require

AXES = {
    "prefix": [False, True],
    "bias": ["none", "float", "bool", "broadcast"],
    "causal": [False, True],
    "scale": [None, 0.3],
    "strided": [False, True],
    "grad": ["q", "k", "v", "kp", "vp", "bias", "all"],
}
EPS = 1e-5      # float32: a few ulps of O(1) values, above the kernels' reordered fp32 sums (~1e-6)
B, H = 1, 2


def _valid(prefix, bias, causal, scale, strided, grad):
    if grad in ("kp", "vp") and not prefix:
        return False
    return not (grad == "bias" and bias in ("none", "bool"))


FULL = [c for c in itertools.product(*AXES.values()) if _valid(*c)]
COVER = pairwise(FULL)


def _id(c):
    return "-".join(f"{n}={v}" for n, v in zip(AXES, c))


def _params():
    out = []
    for backend, device in BACKENDS:
        for case in (COVER if interpreted(backend, device) else FULL):
            out.append(backend_param(backend, device, (backend, device, case), _id(case)))
    return out


def _shape(case):
    """Small odd sizes that change from case to case (one key block in the interpreter)."""
    i = FULL.index(case)
    return 5 + i % 5, 7 + (3 * i) % 7, 3, (8, 40)[i % 2]       # Sq 5..9, Sk 7..13, Sp, D


def _inputs(case, device, g):
    prefix, bias_kind, causal, scale, strided, grad = case
    Sq, Sk, Sp, D = _shape(case)
    L = Sk + (Sp if prefix else 0)

    def t(S):
        if strided:  # (B, S, H, D) memory, or a slice of a fused (B, S, 2, H, D) tensor, read as (B, H, S, D)
            return torch.randn(B, S, 2, H, D, generator=g)[:, :, 1].transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g)

    x = dict(q=t(Sq), k=t(Sk), v=t(Sk), kp=t(Sp) if prefix else None, vp=t(Sp) if prefix else None)
    bias = None
    if bias_kind == "float":     # a full bias with one masked entry
        bias = torch.randn(B, H, L, Sq, generator=g).transpose(-1, -2) if strided else \
            torch.randn(B, H, Sq, L, generator=g)
        bias[0, 0, 1, 0] = float("-inf")
    elif bias_kind == "bool":    # a keep-mask shared by batch and heads, row 0 fully masked
        bias = torch.rand(L, Sq, generator=g).t() < 0.7 if strided else torch.rand(Sq, L, generator=g) < 0.7
        bias[0] = False
    elif bias_kind == "broadcast":  # key padding as an additive bias (B, 1, 1, L): the last key masked
        bias = torch.randn(B, 1, 1, (1 + strided) * L, generator=g)[..., ::1 + strided]
        bias[..., -1] = float("-inf")
    x["bias"] = bias
    if strided:
        assert not x["q"].is_contiguous() and (bias is None or not bias.is_contiguous())
    x = {n: (None if v is None else v.to(device)) for n, v in x.items()}
    names = [n for n in ("q", "k", "v", "kp", "vp", "bias") if x[n] is not None and x[n].is_floating_point()]
    leaves = names if grad == "all" else [grad]
    return x, leaves


def _call(fn, x, case, **kw):
    _, _, causal, scale, _, _ = case
    prefix = None if x["kp"] is None else (x["kp"], x["vp"])
    return fn(x["q"], x["k"], x["v"], attn_bias=x["bias"], causal=causal, scale=scale, kv_prefix=prefix, **kw)


def _grads(fn, x, leaves, do, cast, case, **kw):
    """(out, grads of the leaves) of fn on copies of x cast by `cast`, leaves requiring grad."""
    y = {n: (v if v is None or not v.is_floating_point() else cast(v).detach().requires_grad_(n in leaves))
         for n, v in x.items()}
    out = _call(fn, y, case, **kw)
    grads = torch.autograd.grad(out, [y[n] for n in leaves], cast(do))
    return out.detach(), grads


def _within(name, got, ref, low):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values from finite inputs"
    err = (got.double() - ref).abs().max().item()
    base = (low.double() - ref).abs().max().item()
    bound = 2 * base + EPS * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > 2 x plain PyTorch's {base:.3g} + eps"


@pytest.mark.parametrize("combo", _params())
def test_forward_backward(combo):
    backend, device, case = combo
    _require(backend)
    g = torch.Generator().manual_seed(FULL.index(case))
    x, leaves = _inputs(case, torch.device(device), g)
    do = torch.randn(x["q"].shape, generator=g).to(device)
    out, grads = _grads(diffkern.ops.attention, x, leaves, do, lambda t: t, case, backend=backend)
    ref, ref_grads = _grads(reference.attention, x, leaves, do, lambda t: t.double(), case, upcast=True)
    low, low_grads = _grads(_plain, x, leaves, do, lambda t: t, case)
    assert out.dtype == x["q"].dtype
    _within("out", out, ref, low)
    for name, gr, r, lo in zip(leaves, grads, ref_grads, low_grads):
        _within(f"grad {name}", gr, r, lo)


def test_the_cover_meets_every_pair():
    """Every value of every axis meets every value of every other axis in the Triton cover (where the
    full product has such a case), and the cover is much smaller than the product."""
    names = list(AXES)
    for a, b in itertools.combinations(range(len(names)), 2):
        want = {(c[a], c[b]) for c in FULL}
        assert want == {(c[a], c[b]) for c in COVER}, (names[a], names[b])
    assert len(COVER) < len(FULL) / 5
