"""dynamic_threshold: Imagen's dynamic thresholding by selection (no sort), with its backend table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import _dispatch, _ext
from diffkern.ops import _backends
from diffkern.kernels import reference

OP = "dynamic_threshold"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dynamic_threshold(x, percentile=0.995, max_value=None, *, backend=None):
    """Imagen dynamic thresholding (Saharia et al. 2022, sec. 2.3) of a batch of samples.

    Per sample b: ``s_b = quantile(|x_b|.flatten(), percentile)`` with torch.quantile's 'linear'
    interpolation (position ``percentile * (n - 1)`` between the two order statistics around it),
    then ``s_b = max(s_b, 1)``, then ``s_b = min(s_b, max_value)`` if max_value is given; the result
    is ``clamp(x_b, -s_b, s_b) / s_b``. This is diffusers' ``DDPMScheduler._threshold_sample`` with
    ``dynamic_thresholding_ratio=percentile`` and ``sample_max_value=max_value``.

    The kernel backends find the two order statistics exactly by radix selection over the float32
    bit patterns of |x| (order-preserving for non-negative floats), never a full sort, and take any
    number of elements per sample (torch.quantile stops at 2^24).

    Args:
        x: (B, ...) with at least 1 dim; float32, float16 or bfloat16 (float64 on the reference
            backend only). Any strides (non-contiguous input is read through a contiguous copy).
            Half-precision values are widened to float32 exactly, so the order statistics are exact.
        percentile: in [0, 1]; 0 selects min |x_b|, 1 selects max |x_b|.
        max_value: None or a number >= 1, the upper bound of s_b.
        backend: "reference", "cpu", "triton" or "cuda"; None picks one (see diffkern.use_backend
            and `dynamic_threshold_backend`).

    Returns:
        Tensor of x's shape and dtype (contiguous). x is never modified. NaN / Inf (every backend
        alike; tests/ops/test_nonfinite.py): a sample holding any NaN gets s_b = NaN and an
        all-NaN output (as torch.quantile returns NaN). +-inf are ordered like any value: s_b =
        inf (only without max_value) gives 0 for finite elements and NaN (inf / inf) for infinite
        ones, as the formula does. The interpolation is s_b = v_lo + w (v_hi - v_lo), w = pos - lo,
        in float64, and s_b = v_lo exactly when w = 0 or v_lo = v_hi: so [1, inf] at percentile 0
        gives s_b = 1 (output [1, 1]), at any percentile > 0 s_b = inf; where both order statistics
        are inf, s_b = inf (torch.quantile returns NaN in these cases: 0 * inf, or inf - inf in its
        lerp for weights >= 0.5). s_b and the
        division are computed in float32 (float64 on the reference backend); the interpolation
        weight in float64. Not differentiable on the kernel backends (a sampler step needs no grad).

    Equivalent PyTorch::

        a = x.reshape(B, -1).float()
        s = torch.quantile(a.abs(), percentile, dim=1).clamp(min=1, max=max_value)[:, None]
        y = (torch.clamp(a, -s, s) / s).reshape(x.shape).to(x.dtype)
    """
    call = _check(x, percentile, max_value)
    chosen = _dispatch.select(OP, call, x.device.type, backend)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return chosen.run(call)


def dynamic_threshold_backend(x, percentile=0.995, max_value=None, *, backend=None):
    """Name of the backend `dynamic_threshold` would use for these arguments (raises as it would)."""
    call = _check(x, percentile, max_value)
    return _dispatch.select(OP, call, x.device.type, backend).name


@dataclass
class _Call:
    x: torch.Tensor
    percentile: float
    max_value: float | None


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(x, percentile, max_value):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dynamic_threshold: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"dynamic_threshold: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"dynamic_threshold: x must have at least 1 dim (B, ...), got shape "
                         f"{tuple(x.shape)}")
    if not _is_number(percentile):
        raise TypeError(f"dynamic_threshold: percentile must be a number, got {type(percentile).__name__}")
    if not (0.0 <= percentile <= 1.0):  # also rejects NaN
        raise ValueError(f"dynamic_threshold: percentile must be in [0, 1], got {percentile!r}")
    if max_value is not None:
        if not _is_number(max_value):
            raise TypeError("dynamic_threshold: max_value must be a number or None, got "
                            f"{type(max_value).__name__}")
        if not (max_value >= 1.0):  # also rejects NaN
            raise ValueError(f"dynamic_threshold: max_value must be >= 1 or None, got {max_value!r}")
    return _Call(x, float(percentile), None if max_value is None else float(max_value))


# ---------------------------------------------------------------------------------------------
# kernel entry points: (x, percentile, max_value, out=None) -> (y, thresholds (B,) float32).
# `out`, when given, must be contiguous with x's shape and dtype; tests pass a NaN-poisoned one.

def _run_compiled(x, percentile, max_value, out=None):
    return tuple(_ext.extension().dynamic_threshold_forward(x.contiguous(), percentile, max_value, out))


def _run_triton(x, percentile, max_value, out=None):
    from diffkern.kernels.triton import dynamic_threshold as tdt

    return tdt.dynamic_threshold_forward(x.contiguous(), percentile, max_value, out)


def _kernel_runner(kernel):
    return lambda call: kernel(call.x, call.percentile, call.max_value)[0]


def _run_reference(call):
    return reference.dynamic_threshold(call.x, call.percentile, call.max_value)


# ---------------------------------------------------------------------------------------------
# backend table

_cpu_unavailable = _backends.extension_unavailable("dynamic_threshold_forward")
_cuda_unavailable = _backends.extension_unavailable("dynamic_threshold_forward", need_cuda=True)
_triton_unavailable = _backends.triton_unavailable


def _triton_reasons(call):
    reasons = _backends.tensor_reasons(call.x, _backends.triton_device_types(), KERNEL_DTYPES)
    n = call.x.numel() // max(call.x.shape[0], 1)
    if n >= 2**31:  # int32 histogram counts
        reasons.append(f"at most 2^31 - 1 elements per sample, got {n}")
    if call.x.shape[0] > 65535:  # the batch is grid axis 1
        reasons.append(f"at most 65535 samples, got {call.x.shape[0]}")
    return reasons

_fam = _dispatch.op_family(OP)
_fam.register(_dispatch.Backend(
    "reference", _run_reference, lambda: "",
    _backends.takes("x", None, KERNEL_DTYPES + (torch.float64,)),
    "eager PyTorch in float64: the two order statistics by kthvalue, lerp, clamp, divide"))
_fam.register(_dispatch.Backend(
    "cpu", _kernel_runner(_run_compiled), _cpu_unavailable,
    _backends.takes("x", ("cpu",), KERNEL_DTYPES),
    "C++ radix select + at::vec clamp/scale, at::parallel_for"))
_fam.register(_dispatch.Backend(
    "cuda", _kernel_runner(_run_compiled), _cuda_unavailable,
    _backends.takes("x", ("cuda",), KERNEL_DTYPES),
    "CUDA C++: 3 digit-histogram passes (shared-memory histograms) + apply pass"))
_fam.register(_dispatch.Backend(
    "triton", _kernel_runner(_run_triton), _triton_unavailable, _triton_reasons,
    "Triton: 3 digit-histogram passes (11+10+10 bits) + apply pass"))
# Automatic choice, fastest first. CPU: the C++ kernel is 30-110x torch.quantile (diffusers' way) on
# the benchmark shapes (2 cores, 2026-11-26: (4, 3, 256, 256) fp32 0.83 ms vs 33.6 ms); the Triton
# interpreter is for tests only. CUDA: the cuda and triton backends are compile-checked (sm_80,
# sm_90) / interpreter-tested but have never run on a GPU, so CUDA tensors default to the reference
# until `bash benchmarks/gpu_suite.sh all` has verified and timed them (ask for them with backend=).
_fam.priority = {"cpu": ["cpu", "reference"], "cuda": ["reference"]}

# forward kernels of the kernel backends, for tests that hand them a poisoned `out`
FORWARD_KERNELS = {"cpu": _run_compiled, "cuda": _run_compiled, "triton": _run_triton}

