"""Plain-PyTorch references: the truth for tests (with upcast=True, in float64) and the baseline
for benchmarks (eager PyTorch, exactly what a user would write)."""

import torch
import torch.nn.functional as F


def _per_channel(t, x):
    """(N, C) -> (N, C, 1, ..., 1) broadcastable against x."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None,
               activation=None, upcast=False):
    """act((GroupNorm(x) * weight + bias) * (1 + scale) + shift); float64 throughout if upcast."""
    if upcast:
        x, weight, bias, scale, shift = (None if t is None else t.double()
                                         for t in (x, weight, bias, scale, shift))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + _per_channel(scale, x)) + _per_channel(shift, x)
    if activation == "silu":
        y = F.silu(y)
    return y
