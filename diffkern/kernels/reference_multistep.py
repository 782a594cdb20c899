"""Plain-PyTorch reference of diffkern.ops.sampler_update (the multistep / Euler-type update)."""

from __future__ import annotations

import torch

from diffkern.kernels.reference import row_quantile


def layout(num_history, aux=False):
    """Column indices of the sampler_update coefficient row for H history tensors:
    cx, cp, a, b, c_1..c_H, std(, a2, b2, d_1..d_H). Returns (K, dict of name -> index or slice)."""
    H = num_history
    idx = {"cx": 0, "cp": 1, "a": 2, "b": 3, "c": slice(4, 4 + H), "std": 4 + H}
    K = 5 + H
    if aux:
        idx.update({"a2": K, "b2": K + 1, "d": slice(K + 2, K + 2 + H)})
        K += 2 + H
    return K, idx


def _term(c, h):
    return torch.where(c != 0, c * h, 0)


def sampler_update(sample, model_output, coeffs, history=(), *, uncond_output=None, guidance_scale=1.0,
                   clip="none", clip_range=1.0, dynamic_percentile=0.995, dynamic_max_value=1.0, noise=None,
                   aux=False, upcast=False):
    """pred = uncond + w (cond - uncond); d = clip(cx x + cp pred); out = a x + b d + sum_j c_j h_j +
    std noise (and aux = a2 x + b2 d + sum_j d_j h_j). float32 math (float64 for float64 / upcast).
    -> (out, d) or (out, d, aux)."""
    work = torch.float64 if (upcast or sample.dtype == torch.float64) else torch.float32
    out_dtype = work if upcast else sample.dtype
    H = len(history)
    _, ix = layout(H, aux)
    k = coeffs.to(work).reshape(coeffs.shape + (1,) * (sample.dim() - 1)).unbind(1)
    x = sample.to(work)
    pred = model_output.to(work)
    if uncond_output is not None:
        u = uncond_output.to(work)
        pred = u + guidance_scale * (pred - u)
    d = k[ix["cx"]] * x + k[ix["cp"]] * pred
    if clip == "static":
        d = d.clamp(-clip_range, clip_range)
    elif clip == "dynamic":  # diffusers' _threshold_sample
        # the quantile rule of every backend (kthvalue, float64 interpolation): torch.quantile gives
        # NaN for a row whose order statistics are inf and stops at 2^24 elements
        s = row_quantile(d.abs().reshape(d.shape[0], -1), dynamic_percentile)
        s = torch.clamp(s, min=1, max=dynamic_max_value).reshape((-1,) + (1,) * (x.dim() - 1))
        d = torch.clamp(d, -s, s) / s
    hs = [h.to(work) for h in history]
    out = k[ix["a"]] * x + k[ix["b"]] * d
    for j, h in enumerate(hs):  # a zero coefficient drops its term, as in the kernels
        out = out + _term(k[4 + j], h)
    if noise is not None:
        out = out + _term(k[ix["std"]], noise.to(work))
    res = [out, d]
    if aux:
        a2 = k[ix["a2"]] * x + k[ix["b2"]] * d
        for j, h in enumerate(hs):
            a2 = a2 + _term(k[ix["d"].start + j], h)
        res.append(a2)
    return tuple(r.to(out_dtype).contiguous() for r in res)
