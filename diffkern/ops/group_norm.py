"""group_norm: GroupNorm (+ ADM scale-shift) (+ SiLU / GELU) in one pass, with its backend table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import _dispatch
from diffkern.ops import _backends
from diffkern.ops import _group_norm_kernels as _kernels
from diffkern.ops._group_norm_kernels import FORWARD_KERNELS  # noqa: F401  (tests hand them poisoned outputs)
from diffkern.kernels import reference

OP = "group_norm"
ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None,
               activation=None, backend=None):
    """GroupNorm with optional ADM scale-shift and SiLU or GELU, fused.

    Computes ``act((GN(x) * weight + bias) * (1 + scale) + shift)``, the "scale-shift norm"
    (AdaGN) of the ADM UNets of GLIDE, the DALL-E 2 decoder and Imagen, the plain
    GroupNorm + SiLU of the SD/LDM UNets, and the GroupNorm (+ scale-shift) + GELU of DeepFloyd IF's
    resnets (diffusers' act_fn "gelu" = nn.GELU(), the erf form).

    Args:
        x: (N, C, *spatial), 0 to 3 spatial dims; float32, float16 or bfloat16 (float64 on the
            reference backend only). Contiguous or channels_last: the output keeps x's memory
            format. Other strides are accepted and read through one contiguous copy (the output is
            then contiguous).
        num_groups: G, dividing C. Statistics are per sample and group, over C/G channels and
            all spatial positions, biased variance, accumulated in float32 (float64 for float64).
        weight, bias: (C,) per-channel affine, x's dtype and device, or None.
        eps: added to the variance.
        scale, shift: (N, C), x's dtype and device, given together or not at all; broadcast
            over the spatial dims.
        activation: None, "silu", "gelu" (exact, erf: F.gelu) or "gelu_tanh" (F.gelu(approximate="tanh")).
        backend: "reference", "cpu", "cuda" or "triton"; None picks one (see
            diffkern.use_backend and `group_norm_backend`).

    Returns:
        Tensor of x's shape, dtype and memory format. x is never modified. N = 0 gives an empty
        result. Differentiable in x, weight, bias, scale and shift on every backend (the kernel
        backends save per-group mean/rstd and compute the backward with PyTorch ops).

    NaN / Inf (every backend alike; tests/ops/test_nonfinite.py): a NaN, +inf or -inf anywhere in
    x[n, group g] makes that group's mean and variance NaN, so every output of (n, g) is NaN and
    the other groups are untouched. A NaN in weight[c] or bias[c] makes channel c NaN in every
    sample; a NaN in scale[n, c] or shift[n, c] makes y[n, c] NaN. Infinite weight, bias, scale or
    shift follow IEEE arithmetic of the formula; the kernel backends compute GELU as v * Phi(v) and its
    tanh form as v * sigmoid(2u), so GELU(+inf) = +inf and GELU(-inf) = NaN there (eager PyTorch's
    CPU GELU gives NaN for +inf too, which the reference backend inherits).

    Equivalent PyTorch::

        y = F.group_norm(x, num_groups, weight, bias, eps)
        if scale is not None:
            y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        if activation == "silu":
            y = F.silu(y)
        elif activation in ("gelu", "gelu_tanh"):
            y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    """
    call = _check(x, num_groups, weight, bias, eps, scale, shift, activation)
    chosen = _dispatch.select(OP, call, x.device.type, backend)
    if x.numel() == 0:
        return torch.empty_like(x)
    return chosen.run(call)


def group_norm_backend(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None,
                       activation=None, backend=None):
    """Name of the backend `group_norm` would use for these arguments (raises as it would)."""
    call = _check(x, num_groups, weight, bias, eps, scale, shift, activation)
    return _dispatch.select(OP, call, x.device.type, backend).name


@dataclass
class _Call:
    x: torch.Tensor
    num_groups: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    activation: str | None


def _check_param(t, name, x, shape):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"group_norm: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"group_norm: {name} must be on x's device {x.device}, got {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"group_norm: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check(x, num_groups, weight, bias, eps, scale, shift, activation):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"group_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.dim() > 5:
        raise ValueError(f"group_norm: x must be (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    N, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"group_norm: num_groups {num_groups} must divide the channel count {C}")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"group_norm: eps must be a non-negative number, got {eps!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm: scale and shift must be given together (got only "
                         f"{'scale' if shift is None else 'shift'})")
    _check_param(weight, "weight", x, (C,))
    _check_param(bias, "bias", x, (C,))
    _check_param(scale, "scale", x, (N, C))
    _check_param(shift, "shift", x, (N, C))
    return _Call(x, num_groups, weight, bias, float(eps), scale, shift, activation)


class _GroupNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups, eps, activation, kernel):
        y, mean, rstd = kernel(x, num_groups, weight, bias, scale, shift, eps, activation)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.activation = num_groups, activation
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        return _kernels.backward(ctx, dy)


def _kernel_runner(name):
    def run(call):
        kernel = FORWARD_KERNELS[name]
        tensors = (call.x, call.weight, call.bias, call.scale, call.shift)
        act = call.activation
        if torch.compiler.is_compiling():  # one opaque, differentiable node in the compiled graph
            from diffkern.ops._group_norm_op import group_norm_fwd

            return group_norm_fwd(*tensors, call.num_groups, call.eps, _kernels.activation_code(act), name)[0]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _GroupNormFn.apply(*tensors, call.num_groups, call.eps, act, kernel)
        # inference: skip autograd's bookkeeping (several microseconds a call, which is most of
        # the time at batch 2 on a GPU)
        return kernel(call.x, call.num_groups, call.weight, call.bias, call.scale, call.shift, call.eps, act)[0]
    return run


def _run_reference(call):
    return reference.group_norm(call.x, call.num_groups, call.weight, call.bias, call.eps, scale=call.scale,
                                shift=call.shift, activation=call.activation, shifted=True)


# ---------------------------------------------------------------------------------------------
# backend table

def _ext_unavailable(need_cuda):
    return _backends.extension_unavailable("group_norm_forward", need_cuda)


_triton_unavailable = _backends.triton_unavailable


def _triton_reasons(call):
    return _backends.tensor_reasons(call.x, _backends.triton_device_types(), KERNEL_DTYPES)

_fam = _dispatch.op_family(OP)
_fam.register(_dispatch.Backend(
    "reference", _run_reference, lambda: "",
    _backends.takes("x", None, KERNEL_DTYPES + (torch.float64,)),
    "eager PyTorch: F.group_norm (on x minus a per-group shift), then scale-shift, then F.silu / F.gelu"))
_fam.register(_dispatch.Backend(
    "cpu", _kernel_runner("cpu"), _ext_unavailable(False),
    _backends.takes("x", ("cpu",), KERNEL_DTYPES),
    "C++ kernel, at::vec + at::parallel_for"))
_fam.register(_dispatch.Backend(
    "cuda", _kernel_runner("cuda"), _ext_unavailable(True),
    _backends.takes("x", ("cuda",), KERNEL_DTYPES),
    "CUDA C++ kernel"))
_fam.register(_dispatch.Backend(
    "triton", _kernel_runner("triton"), _triton_unavailable, _triton_reasons, "Triton kernel"))
# Automatic choice, fastest first, by the measured numbers (GN + SiLU, fp32, 2 threads):
#   CPU, benchmarks/results/group_norm-cpu-x86-64-2-threads-avx512.md (EPYC, 2026-11-26), x eager:
#     contiguous     sd15 2.67 / 2.33 / 2.17 / 1.59x, glide (+scale-shift) 3.22 / 3.02 / 2.70 / 2.73x
#     channels_last  sd15 1.87 / 1.41 / 1.28 / 0.95x, glide (+scale-shift) 2.64 / 2.03 / 2.59 / 1.67x
#   Xeon, benchmarks/results/group_norm-cpu-xeon-2-threads-avx512-run{1,2,3}.md (2026-12-01):
#     sd15 (2, 320, 64, 64) contiguous 2.57 / 2.72 / 2.68x, channels_last 1.77 / 1.67 / 1.81x,
#     (2, 1280, 8, 8) channels_last 0.88 / 0.91 / 0.97x.
#   The one loss, 0.88-0.97x at (2, 1280, 8, 8) channels_last (5-12% slower than eager PyTorch, whose
#   channels_last GroupNorm loses all precision when |mean| >> std: x = 1000 + randn, torch 2.13: max
#   error 3.8 at that very shape, 1242 at (2, 64, 24, 24); the kernel 3e-7 and 5e-7; see also
#   tests/ops/test_group_norm.py::test_large_offset_fp32): the kernel stays first for every CPU input,
#   as a 5-12% loss (~10 us) on the smallest SD tensor does not buy a wrong answer on offset data.
#   The Triton interpreter is for tests only and never picked automatically.
# CUDA: benchmarks/results/group_norm-nvidia-h200.md.
_fam.priority = {"cpu": ["cpu", "reference"], "cuda": ["cuda", "triton", "reference"]}
