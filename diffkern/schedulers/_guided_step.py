"""The fused sampler update the schedulers call (`diffkern.ops.guided_step`), and the x0 clipping
the DDIM scheduler applies itself when diffusers' default derives eps from the unclipped x0."""

from __future__ import annotations

import torch

def threshold_sample(x0, percentile, max_value):
    """Imagen dynamic thresholding, exactly diffusers' `_threshold_sample` (arXiv:2205.11487)."""
    dtype = x0.dtype
    b = x0.shape[0]
    flat = x0.float().reshape(b, -1) if dtype not in (torch.float32, torch.float64) else x0.reshape(b, -1)
    s = torch.quantile(flat.abs(), percentile, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def clip_x0(x0, clip, clip_range, dynamic_percentile, dynamic_max_value):
    """Clip a predicted x0 as guided_step does ("none", "static" or "dynamic")."""
    if clip == "static":
        return x0.clamp(-clip_range, clip_range)
    if clip == "dynamic":
        return threshold_sample(x0, dynamic_percentile, dynamic_max_value)
    return x0


def resolve():
    """(function, name) of the fused step the schedulers call."""
    from diffkern import ops

    return ops.guided_step, "diffkern.ops.guided_step"
