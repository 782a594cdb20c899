"""dynamic_threshold on every backend against a sort-based float64 reference and diffusers."""

import pytest
import torch

import diffkern
from diffkern import _ext
from diffkern.ops.dynamic_threshold import FORWARD_KERNELS, dynamic_threshold_backend
from tests.conftest import TOL, backend_device

BACKENDS = ["reference", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]
KERNEL_BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# odd and prime sizes, batch 1, one element per sample, > one Triton program per sample
SHAPES = [(1, 7), (3, 5, 11, 13), (2, 3, 37, 23), (4, 1), (2, 9001)]
PERCENTILES = [0.0, 0.5, 0.9, 0.995, 1.0]


def _require(name):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "cpu" and _ext.extension() is None:
        pytest.fail(f"the C++ extension is not built: {_ext.extension_error()}")
    if name == "triton":
        pytest.importorskip("triton")
    why = diffkern.ops.unavailable_reasons("dynamic_threshold").get(name)
    if why:
        pytest.fail(f"backend {name} unavailable: {why}")


def _sorted_reference(x, percentile, max_value=None):
    """Independent truth in float64: full sort, then the 'linear' interpolation by hand."""
    B = x.shape[0]
    a = x.reshape(B, -1).double()
    v = a.abs().sort(dim=1).values
    n = v.shape[1]
    pos = percentile * (n - 1)
    lo, hi = int(pos // 1), min(int(-(-pos // 1)), n - 1)
    s = v[:, lo] + (pos - lo) * (v[:, hi] - v[:, lo])
    s = torch.where(torch.isnan(a).any(1), torch.full_like(s, float("nan")), s).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    return (torch.clamp(a, -s[:, None], s[:, None]) / s[:, None]).reshape(x.shape), s


def _run(backend, x, percentile, max_value=None):
    return diffkern.ops.dynamic_threshold(x, percentile, max_value, backend=backend)


def _check(y, x, percentile, max_value=None):
    want, _ = _sorted_reference(x, percentile, max_value)
    atol, rtol = TOL.get(x.dtype, (1e-12, 1e-12))
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("percentile", PERCENTILES)
@pytest.mark.parametrize("max_value", [None, 1.5])
def test_matches_float64_sort(backend, dtype, shape, percentile, max_value):
    _require(backend)
    x = (torch.randn(shape, device=backend_device(backend)) * 3).to(dtype)
    x0 = x.clone()
    y = _run(backend, x, percentile, max_value)
    assert torch.equal(x, x0), "x was modified"
    _check(y.cpu(), x.cpu(), percentile, max_value)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("percentile", [0.0, 0.3, 0.995, 1.0])
def test_thresholds_are_exact_order_statistics(backend, dtype, percentile):
    """s_b from the kernel is the float64 interpolation of the exact order statistics, rounded once
    to float32; the poisoned (NaN) output is fully written."""
    _require(backend)
    dev = backend_device(backend)
    x = (torch.randn(3, 4001, device=dev) * 50).to(dtype)  # s >> 1: the max(s, 1) does not hide errors
    out = torch.full_like(x, float("nan"))
    y, s = FORWARD_KERNELS[backend](x, percentile, None, out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    _, want = _sorted_reference(x.cpu(), percentile)
    torch.testing.assert_close(s.cpu(), want.float(), atol=0, rtol=0)


def _tie_inputs(kind, device):
    g = torch.Generator().manual_seed(1)
    if kind == "few_values":  # many equal values: ranks lo and hi inside one run of ties
        x = torch.randint(-4, 5, (3, 999), generator=g).float() * 1.25
    elif kind == "two_buckets":  # lo and hi in different top-digit buckets (1.0 vs 100.0)
        x = torch.cat([torch.ones(2, 500), torch.full((2, 500), -100.0)], 1)
    elif kind == "low_bits":  # differ only in the last mantissa bits: all three digit levels used
        base = torch.tensor(3.0).view(torch.int32)
        x = (base + torch.randint(0, 2048, (2, 777), generator=g, dtype=torch.int32)).view(torch.float32)
    elif kind == "constant_big":
        x = torch.full((2, 321), -5.0)
    else:  # constant_small: s = max(0.3, 1) = 1, y = x
        x = torch.full((2, 321), 0.3)
    return x.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["few_values", "two_buckets", "low_bits", "constant_big", "constant_small"])
@pytest.mark.parametrize("percentile", [0.0, 0.4995, 0.5, 0.77, 0.995, 1.0])
def test_ties_and_constants(backend, kind, percentile):
    _require(backend)
    x = _tie_inputs(kind, backend_device(backend))
    _check(_run(backend, x, percentile).cpu(), x.cpu(), percentile)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_per_sample(backend, dtype):
    """A sample holding a NaN comes out all NaN (s = NaN, as torch.quantile gives); others are untouched."""
    _require(backend)
    x = (torch.randn(3, 2, 50, device=backend_device(backend)) * 3).to(dtype)
    x[1, 1, 7] = float("nan")
    x[2, 0, 0] = -float("nan")
    y = _run(backend, x, 0.9).cpu()
    assert torch.isnan(y[1:]).all()
    _check(y[:1], x[:1].cpu(), 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("percentile", [0.995, 0.6])
@pytest.mark.parametrize("max_value", [None, 1.0, 2.5])
def test_matches_diffusers(backend, percentile, max_value):
    """External truth: diffusers' DDPMScheduler._threshold_sample (torch.quantile in float32)."""
    diffusers = pytest.importorskip("diffusers")
    _require(backend)
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=percentile,
                                    sample_max_value=max_value)
    x = torch.randn(2, 4, 16, 16) * 4
    want = sched._threshold_sample(x.clone())
    y = _run(backend, x.to(backend_device(backend)), percentile, max_value).cpu()
    # torch.quantile interpolates in float32 (rank and weight too): a few ulp apart from our float64
    torch.testing.assert_close(y, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_more_than_2_pow_24_elements(backend):
    """torch.quantile refuses n > 2^24; the reference (kthvalue) and the C++ kernel do not."""
    _require(backend)
    n = (1 << 24) + 3
    x = torch.randn(1, n) * 3
    x[0, :1000] = 7.0  # ties at the top
    p = 0.9999  # pos = p (n - 1) is not an integer: both order statistics matter
    y = _run(backend, x, p)
    v = x.abs().flatten()
    pos = p * (n - 1)
    lo = int(pos)
    v_lo = v.kthvalue(lo + 1).values.double()
    v_hi = v.kthvalue(lo + 2).values.double()
    s = float(v_lo + (pos - lo) * (v_hi - v_lo))
    idx = torch.randint(0, n, (100000,))
    want = torch.clamp(x[0, idx].double(), -s, s) / s
    torch.testing.assert_close(y[0, idx].double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["random", "two_buckets", "low_bits", "nan"])
def test_one_large_sample(backend, kind):
    """B = 1 with n well above the C++ grain: each pass of the sample is split across threads."""
    _require(backend)
    n = 200003
    g = torch.Generator().manual_seed(2)
    p = 0.995
    if kind == "two_buckets":  # 100001 ones then 100002 hundreds: lo is the last 1, hi the first 100
        x = torch.ones(1, n)
        x[0, n // 2:] = -100.0
        p = 100000.5 / (n - 1)
    elif kind == "low_bits":
        base = torch.tensor(3.0).view(torch.int32)
        x = (base + torch.randint(0, 2048, (1, n), generator=g, dtype=torch.int32)).view(torch.float32)
    else:
        x = torch.randn(1, n, generator=g) * 3
        if kind == "nan":
            x[0, 12345] = float("nan")
    _check(_run(backend, x, p), x, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    _require(backend)
    dev = backend_device(backend)
    wide = torch.randn(3, 10, 22, device=dev) * 3
    x = wide[:, :, ::2]
    _check(_run(backend, x, 0.95).cpu(), x.cpu(), 0.95)
    assert _run(backend, torch.empty(0, 4, device=dev), 0.95).shape == (0, 4)


def test_reference_takes_float64_and_kernels_refuse_it():
    x = torch.randn(2, 300, dtype=torch.float64) * 3
    _check(_run("reference", x, 0.9), x, 0.9)
    with pytest.raises(ValueError, match="dtype"):
        _run("cpu", x, 0.9)


def test_automatic_choice_is_the_cpu_kernel():
    _require("cpu")
    assert dynamic_threshold_backend(torch.randn(2, 8)) == "cpu"


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(2, 3), 1.5), ValueError, "percentile"),
    ((torch.randn(2, 3), -0.1), ValueError, "percentile"),
    ((torch.randn(2, 3), float("nan")), ValueError, "percentile"),
    ((torch.randn(2, 3), "high"), TypeError, "percentile"),
    ((torch.randn(2, 3), 0.9, 0.5), ValueError, "max_value"),
    ((torch.randn(2, 3), 0.9, "x"), TypeError, "max_value"),
    ((torch.ones(2, 3, dtype=torch.int32), 0.9), TypeError, "x must be a floating-point"),
    ((torch.tensor(2.0), 0.9), ValueError, "x must have at least 1 dim"),
    (([1.0, 2.0], 0.9), TypeError, "x must be a Tensor"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        diffkern.ops.dynamic_threshold(*args)


def test_compiled_entry_point_validates():
    """The binding checks its inputs too (Python errors, never a crash)."""
    _require("cpu")
    C = _ext.extension()
    with pytest.raises(ValueError, match="percentile"):
        C.dynamic_threshold_forward(torch.randn(2, 3), 2.0, None)
    with pytest.raises(ValueError, match="max_value"):
        C.dynamic_threshold_forward(torch.randn(2, 3), 0.5, 0.5)
    with pytest.raises(TypeError, match="float32"):
        C.dynamic_threshold_forward(torch.randn(2, 3, dtype=torch.float64), 0.5, None)
    with pytest.raises(ValueError, match="contiguous"):
        C.dynamic_threshold_forward(torch.randn(3, 4).t(), 0.5, None)
    with pytest.raises(ValueError, match="at least 1 dim"):
        C.dynamic_threshold_forward(torch.tensor(1.0), 0.5, None)
