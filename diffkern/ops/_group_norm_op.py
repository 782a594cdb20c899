"""group_norm's kernel backends as a torch.library custom op, used while torch.compile traces, so
that a compiled model keeps the fused kernel in one graph (eager calls skip the op's dispatcher
overhead and call the kernels directly). Imported on first use under compile, never at import."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from diffkern.ops import _group_norm_kernels as gk


@torch.library.custom_op("diffkern::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
                   shift: Optional[Tensor], num_groups: int, eps: float, activation: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    # activation: the kernels' code (gk.ACTIVATION_CODES), an int so that the schema stays simple
    y, mean, rstd = gk.FORWARD_KERNELS[backend](x, num_groups, weight, bias, scale, shift, eps,
                                                gk.activation_name(activation))
    return y, mean, rstd


@group_norm_fwd.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, activation, backend):
    dense = x.is_contiguous() or gk.is_channels_last_like(x)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) if dense else \
        torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return y, stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.activation = num_groups, activation


def _backward(ctx, dy, dmean, drstd):
    return gk.backward(ctx, dy)


group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
