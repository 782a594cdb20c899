"""sampler_update: the element-wise update of multistep / Euler-type samplers (Euler, Euler
ancestral, Heun, LMS, PNDM, DPM-Solver++, UniPC) as one fused pass, with its backend table.

A sampler is a set of coefficients: every one of those updates is a linear combination of the
sample, the denoised prediction of this step and tensors kept from earlier steps, plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import _dispatch, _ext
from diffkern.kernels import reference_multistep as reference
from diffkern.ops import _backends
from diffkern.ops.guided_step import guidance_and_clip_scalars, launch_limits, thresholds_by_selection

OP = "sampler_update"
CLIPS = ("none", "static", "dynamic")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HISTORY = 6
layout = reference.layout


def sampler_update(sample, model_output, coeffs, history=(), *, uncond_output=None, guidance_scale=1.0,
                   clip="none", clip_range=1.0, dynamic_percentile=0.995, dynamic_max_value=1.0, noise=None,
                   aux=False, backend=None):
    """One fused sampler update: guidance, conversion to the denoised value, clipping, combination.

    Args:
        sample: x, (B, C, *spatial); float32, float16 or bfloat16 (float64 on the reference only).
        model_output: the (conditional) model output, x's shape, dtype and device.
        coeffs: float32 (or float64) (B, K), per sample, in the order of `layout(len(history), aux)`:
            [cx, cp, a, b, c_1..c_H, std(, a2, b2, d_1..d_H)], K = 5 + H (+ 2 + H with aux).
        history: up to 6 tensors of x's shape, dtype and device (earlier denoised values, derivatives,
            epsilons or samples: whatever the sampler keeps).
        uncond_output: None, or the unconditional output: pred = uncond + guidance_scale * (cond - uncond).
        clip: "none", "static" (d clamped to [-clip_range, clip_range]) or "dynamic" (Imagen dynamic
            thresholding, diffusers' _threshold_sample: per sample s = clamp(quantile(|d|,
            dynamic_percentile), 1, dynamic_max_value), d = clamp(d, -s, s) / s; dynamic_max_value
            must be >= 1, the quantile is `dynamic_threshold`'s).
        noise: None, or a tensor of x's shape (the `std` term).
        aux: also return a second combination (e.g. LMS's derivative, UniPC's corrected sample).
        backend: "reference", "cpu", "triton" or "cuda"; None picks one (`sampler_update_backend`).

    The math, per element (float32; float64 for float64):
        d   = clip(cx * x + cp * pred)                  (x0 from eps / v / sample in any parameterisation)
        out = a * x + b * d + sum_j c_j * h_j + std * noise
        aux = a2 * x + b2 * d + sum_j d_j * h_j
    A zero coefficient c_j, d_j or std drops its own term (an inf / NaN history slot or noise with
    coefficient 0 is harmless, in out and aux separately); cx, cp, a, b, a2 and b2 follow IEEE
    arithmetic (0 * NaN = NaN).

    NaN / Inf (every backend alike; tests/ops/test_random_arguments.py): element-wise, a NaN in an
    input that a kept term reads makes the outputs it feeds NaN there; clipping never turns a NaN into
    a bound. With clip="dynamic" a NaN d anywhere in sample b makes all of sample b's d, out and aux
    NaN (its threshold is NaN), and +-inf are ordered like any value (as `dynamic_threshold`).

    Returns:
        (out, d) or (out, d, aux): x's shape and dtype, contiguous. Inputs are never modified.

    Equivalent PyTorch: `diffkern.kernels.reference_multistep.sampler_update`.
    """
    call = _check(sample, model_output, coeffs, history, uncond_output, guidance_scale, clip, clip_range,
                  dynamic_percentile, dynamic_max_value, noise, aux)
    chosen = _dispatch.select(OP, call, sample.device.type, backend)
    if sample.numel() == 0:
        return tuple(torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
                     for _ in range(3 if aux else 2))
    return chosen.run(call)


def sampler_update_backend(sample, model_output, coeffs, history=(), *, uncond_output=None, guidance_scale=1.0,
                           clip="none", clip_range=1.0, dynamic_percentile=0.995, dynamic_max_value=1.0,
                           noise=None, aux=False, backend=None):
    """Name of the backend `sampler_update` would use for these arguments (raises as it would)."""
    call = _check(sample, model_output, coeffs, history, uncond_output, guidance_scale, clip, clip_range,
                  dynamic_percentile, dynamic_max_value, noise, aux)
    return _dispatch.select(OP, call, sample.device.type, backend).name


@dataclass
class _Call:
    sample: torch.Tensor
    model_output: torch.Tensor
    coeffs: torch.Tensor
    history: tuple
    uncond_output: torch.Tensor | None
    guidance_scale: float
    clip: str
    clip_range: float
    dynamic_percentile: float
    dynamic_max_value: float
    noise: torch.Tensor | None
    aux: bool

    def reference_kwargs(self):
        return dict(uncond_output=self.uncond_output, guidance_scale=self.guidance_scale, clip=self.clip,
                    clip_range=self.clip_range, dynamic_percentile=self.dynamic_percentile,
                    dynamic_max_value=self.dynamic_max_value, noise=self.noise, aux=self.aux)


def _check_tensor(t, name, x):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sampler_update: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"sampler_update: {name} must have sample's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"sampler_update: {name} must be on sample's device {x.device}, got {t.device}")
    if t.shape != x.shape:
        raise ValueError(f"sampler_update: {name} must have sample's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _check(x, m, coeffs, history, uncond, guidance_scale, clip, clip_range, percentile, max_value, noise, aux):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sampler_update: sample must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"sampler_update: sample must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("sampler_update: sample must be (B, *), got a 0-d tensor")
    if clip not in CLIPS:
        raise ValueError(f"sampler_update: clip must be one of {CLIPS}, got {clip!r}")
    if not isinstance(aux, bool):
        raise TypeError(f"sampler_update: aux must be a bool, got {aux!r}")
    guidance_scale, clip_range, percentile, max_value = guidance_and_clip_scalars(
        OP, clip, guidance_scale, clip_range, percentile, max_value)
    _check_tensor(m, "model_output", x)
    if uncond is not None:
        _check_tensor(uncond, "uncond_output", x)
    if noise is not None:
        _check_tensor(noise, "noise", x)
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"sampler_update: history must be a list or tuple of tensors, got {type(history).__name__}")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"sampler_update: at most {MAX_HISTORY} history tensors, got {len(history)}")
    for j, h in enumerate(history):
        _check_tensor(h, f"history[{j}]", x)
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"sampler_update: coeffs must be a Tensor, got {type(coeffs).__name__}")
    if coeffs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"sampler_update: coeffs must be float32 (or float64), got {coeffs.dtype}")
    K, _ = layout(len(history), aux)
    if tuple(coeffs.shape) != (x.shape[0], K):
        raise ValueError(f"sampler_update: coeffs must have shape {(x.shape[0], K)} for {len(history)} history "
                         f"tensors{' and aux' if aux else ''}, got {tuple(coeffs.shape)}")
    if coeffs.device != x.device:
        raise ValueError(f"sampler_update: coeffs must be on sample's device {x.device}, got {coeffs.device}")
    return _Call(x, m, coeffs, tuple(history), uncond, guidance_scale, clip, clip_range, percentile, max_value,
                 noise, aux)


# ---------------------------------------------------------------------------------------------
# kernel backends: the same host plan for every kernel

CLIP_CODES = {c: i for i, c in enumerate(CLIPS)}


def _kernel_runner(launch):
    """launch(call, x, m, u, noise, hist, coeffs, out, d, aux, thresholds, abs_out) runs one pass over
    contiguous tensors; with abs_out (float32 (B, N)) it only writes |unclipped d| there."""
    def run(call, outs=None):
        x = call.sample.contiguous()
        m = call.model_output.contiguous()
        u = None if call.uncond_output is None else call.uncond_output.contiguous()
        noise = None if call.noise is None else call.noise.contiguous()
        hist = [h.contiguous() for h in call.history]
        coeffs = call.coeffs.to(torch.float32).contiguous()
        if outs is None:
            outs = tuple(torch.empty_like(x) for _ in range(3 if call.aux else 2))
        out, d = outs[0], outs[1]
        aux = outs[2] if call.aux else None
        thresholds = None
        if call.clip == "dynamic":
            B = x.shape[0]
            abs_d = d.view(B, -1) if x.dtype == torch.float32 else torch.empty(
                (B, x[0].numel()), dtype=torch.float32, device=x.device)
            launch(call, x, m, u, noise, hist, coeffs, out, d, aux, None, abs_d)
            thresholds = thresholds_by_selection(abs_d, call.dynamic_percentile, call.dynamic_max_value)
        launch(call, x, m, u, noise, hist, coeffs, out, d, aux, thresholds, None)
        return outs
    return run


def _launch_compiled(call, x, m, u, noise, hist, coeffs, out, d, aux, thresholds, abs_out):
    _ext.extension().sampler_update_forward(
        x, m, u, noise, hist, coeffs, out, d, aux, thresholds, abs_out, CLIP_CODES[call.clip],
        call.guidance_scale, call.clip_range)


def _launch_triton(*args):
    from diffkern.kernels.triton import sampler_update as triton_sampler_update  # lazy: no import-time Triton

    return triton_sampler_update.sampler_update(*args)


def _run_reference(call):
    return reference.sampler_update(call.sample, call.model_output, call.coeffs, call.history,
                                    **call.reference_kwargs())


_fam = _dispatch.op_family(OP)
_fam.register(_dispatch.Backend(
    "reference", _run_reference, lambda: "",
    _backends.takes("sample", None, KERNEL_DTYPES + (torch.float64,)),
    "eager PyTorch, one elementwise op per term (kthvalue quantile for dynamic thresholding)"))
_fam.register(_dispatch.Backend(
    "cpu", _kernel_runner(_launch_compiled), _backends.extension_unavailable("sampler_update_forward"),
    _backends.takes("sample", ("cpu",), KERNEL_DTYPES),
    "C++ kernel, at::parallel_for, one pass (two with dynamic thresholding)"))
_fam.register(_dispatch.Backend(
    "triton", _kernel_runner(_launch_triton), _backends.triton_unavailable,
    lambda call: _backends.tensor_reasons(call.sample, _backends.triton_device_types(), KERNEL_DTYPES)
    + launch_limits(call.sample, call.clip, call.sample.device.type == "cuda"),
    "Triton kernel, one pass (two with dynamic thresholding)"))
_fam.register(_dispatch.Backend(
    "cuda", _kernel_runner(_launch_compiled),
    _backends.extension_unavailable("sampler_update_forward", need_cuda=True),
    lambda call: _backends.tensor_reasons(call.sample, ("cuda",), KERNEL_DTYPES)
    + launch_limits(call.sample, call.clip, True),
    "CUDA C++ kernel, one pass (two with dynamic thresholding)"))
# Automatic choice, fastest first. CPU: the C++ kernel (benchmarks/results/schedulers-cpu-*.md has the
# scheduler steps against diffusers'); the Triton interpreter is for tests only. CUDA: the cuda kernel
# is compile-checked only and the Triton kernel has run only in the interpreter, so CUDA tensors
# default to the reference until a GPU run has verified them (backend= asks for them).
_fam.priority = {"cpu": ["cpu", "reference"], "cuda": ["reference"]}

LAUNCHERS = {"cpu": _launch_compiled, "cuda": _launch_compiled, "triton": _launch_triton}
