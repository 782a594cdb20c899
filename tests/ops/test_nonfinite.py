"""NaN / Inf semantics of group_norm, guided_step and dynamic_threshold on every backend, each
case from one table per op. The rule (each op's docstring states it for its arguments): a NaN in
an input reaches every output element computed from it, and a statistic (a group's mean and
variance, a sample's dynamic threshold) computed from a NaN makes every output it scales NaN.
The expected NaN mask is built from that rule here, independently of any backend.
"""

import itertools

import pytest
import torch

import diffkern
from tests.conftest import TOL, backend_device, require_backend
from tests.ops import test_dynamic_threshold_combinations as dtc
from tests.ops import test_group_norm_combinations as gnc
from tests.ops import test_guided_step_combinations as gsc

BACKENDS = [("reference", ()), ("cpu", ()), ("triton", ()), ("cuda", (pytest.mark.cuda,))]


def _params(table, ident):
    return [pytest.param(b, *row, id=f"{b}-{ident(row)}", marks=m) for b, m in BACKENDS for row in table]


def _check(y, want, expect_nan, what):
    """NaN exactly where expect_nan says; everywhere else finite and close to the float64 oracle."""
    got_nan = torch.isnan(y.cpu())
    assert torch.equal(got_nan, expect_nan), (
        f"{what}: NaN at {got_nan.sum().item()} elements, expected {expect_nan.sum().item()} "
        f"(missing {(expect_nan & ~got_nan).sum().item()}, extra {(got_nan & ~expect_nan).sum().item()})")
    keep = ~expect_nan
    atol, rtol = TOL[torch.float32]
    bound = atol + rtol * (1 + want[keep].abs())
    assert torch.isfinite(y.cpu()[keep]).all(), f"{what}: non-finite outside the NaN mask"
    err = (y.cpu()[keep].double() - want[keep]).abs()
    assert (err <= bound).all(), f"{what}: max error {err.max().item():.3g} outside the NaN mask"


# --------------------------------------------------------------------------------------------
# group_norm: a non-finite x poisons its (sample, group) statistics, hence that whole group; a NaN
# in weight/bias[c] poisons channel c of every sample; in scale/shift[n, c] poisons (n, c).

GN_TABLE = list(itertools.product(
    (("x", float("nan")), ("x", float("inf")), ("x", -float("inf")), ("weight", float("nan")),
     ("bias", float("nan")), ("scale", float("nan")), ("shift", float("nan"))),
    (None, "silu"),
    ("contiguous", "channels_last"),
))


@pytest.mark.parametrize("backend,where,activation,layout",
                         _params(GN_TABLE, lambda r: f"{r[0][0]}={r[0][1]}-{r[1]}-{r[2]}"))
def test_group_norm_nonfinite(backend, where, activation, layout):
    require_backend(backend)
    device = backend_device(backend)
    name, value = where
    N, C = gnc.SHAPE[:2]
    G, cg = gnc.GROUPS, C // gnc.GROUPS
    combo = dict(affine=True, scale_shift=True, layout="contiguous")
    t = dict(zip(gnc.NAMES, gnc.inputs(combo, torch.float32, device)))
    n, c = 1, cg + 1  # sample 1, second channel of group 1
    expect = torch.zeros(gnc.SHAPE, dtype=torch.bool)
    if name == "x":
        t["x"][n, c, 2, 1] = value
        expect[n, (c // cg) * cg:(c // cg + 1) * cg] = True
    elif name in ("weight", "bias"):
        t[name][c] = value
        expect[:, c] = True
    else:
        t[name][n, c] = value
        expect[n, c] = True
    t["x"] = gnc.layout(t["x"], layout)
    y = diffkern.ops.group_norm(t["x"], G, t["weight"], t["bias"], gnc.EPS, scale=t["scale"], shift=t["shift"],
                                activation=activation, backend=backend)
    c64 = {k: v.cpu() for k, v in t.items()}
    want = gnc.oracle(c64["x"], G, c64["weight"], c64["bias"], c64["scale"], c64["shift"], activation)
    _check(y, want, expect, f"group_norm {name}={value}")


# --------------------------------------------------------------------------------------------
# guided_step: element-wise, a NaN in sample / model_output / uncond_output (first C channels) at
# (b, c, s) makes x0 and prev NaN there (x0 = pred reads no sample for prediction "sample"); a NaN
# in noise or in a learned-range variance channel makes prev NaN there; uncond's variance channels
# are never read. With clip="dynamic" a NaN in x0 makes sample b's threshold NaN, so all of sample
# b's x0 and prev are NaN.

GS_TABLE = list(itertools.product(
    ("sample", "model_output", "uncond_output", "noise", "variance", "uncond_variance"),
    ("epsilon", "sample", "v_prediction"),
    ("none", "static", "dynamic"),
))


def _gs_expect(where, pred, clip, shape, b, idx):
    x0 = torch.zeros(shape, dtype=torch.bool)
    prev = torch.zeros(shape, dtype=torch.bool)
    feeds_x0 = where in ("model_output", "uncond_output") or (where == "sample" and pred != "sample")
    if feeds_x0:
        x0[(b,) + idx] = True
        if clip == "dynamic":
            x0[b] = True
    prev |= x0
    if where in ("sample", "noise", "variance"):
        prev[(b,) + idx] = True
    return prev, x0


@pytest.mark.parametrize("backend,where,pred,clip", _params(GS_TABLE, lambda r: "-".join(r)))
def test_guided_step_nan(backend, where, pred, clip):
    gsc._require(backend)
    device = backend_device(backend)
    combo = dict(variance="learned_range", uncond=True, noise="given", prediction_type=pred, clip=clip,
                 eps_from_clipped=True)
    inp = gsc.inputs(combo, torch.float32, device)
    b, idx = 1, (2, 3, 1)
    C = gsc.SHAPE[1]
    target = {"sample": ("sample", 0), "model_output": ("model_output", 0), "uncond_output": ("uncond_output", 0),
              "noise": ("noise", 0), "variance": ("model_output", C), "uncond_variance": ("uncond_output", C)}
    key, shift = target[where]
    inp[key][(b, idx[0] + shift) + idx[1:]] = float("nan")
    prev, x0 = diffkern.ops.guided_step(
        inp["sample"], inp["model_output"], inp["coeffs"], uncond_output=inp["uncond_output"],
        guidance_scale=gsc.GUIDANCE, prediction_type=pred, clip=clip, clip_range=gsc.CLIP_RANGE,
        dynamic_percentile=gsc.PERCENTILE, dynamic_max_value=gsc.MAX_VALUE, variance="learned_range",
        noise=inp["noise"], backend=backend)
    cpu = {k: v.cpu() for k, v in inp.items()}
    want_prev, want_x0 = gsc.oracle(cpu["sample"], cpu["model_output"], cpu["coeffs"], cpu["uncond_output"],
                                    cpu["noise"], combo)
    expect_prev, expect_x0 = _gs_expect(where, pred, clip, gsc.SHAPE, b, idx)
    _check(x0, want_x0, expect_x0, f"pred_original_sample ({where})")
    _check(prev, want_prev, expect_prev, f"prev_sample ({where})")


# --------------------------------------------------------------------------------------------
# dynamic_threshold: a NaN anywhere in sample b makes s_b NaN and all of sample b NaN; +-inf are
# ordered like any value: with max_value, s_b is finite and inf maps to +-1; without, a
# threshold that selects inf gives s_b = inf, finite elements 0 and the inf element inf/inf = NaN.

DT_TABLE = list(itertools.product(
    (float("nan"), float("inf"), -float("inf")),
    (0.5, 1.0),
    (None, 2.0),
))


@pytest.mark.parametrize("backend,value,percentile,max_value",
                         _params(DT_TABLE, lambda r: f"{r[0]}-p{r[1]}-max{r[2]}"))
def test_dynamic_threshold_nonfinite(backend, value, percentile, max_value):
    dtc._require(backend)
    device = backend_device(backend)
    x = 3 * torch.randn(3, 2, 37)
    b = 1
    x[b, 1, 5] = value
    expect = torch.zeros(x.shape, dtype=torch.bool)
    if value != value:
        expect[b] = True
    elif percentile == 1.0 and max_value is None:  # s_b = inf: only the inf element is NaN
        expect[b, 1, 5] = True
    y = diffkern.ops.dynamic_threshold(x.to(device), percentile, max_value, backend=backend)
    want = dtc.oracle(x, percentile, max_value)
    _check(y, want, expect, f"dynamic_threshold x={value}")
