"""The Triton attention backend as torch.library custom ops (forward, backward), so that torch.compile
treats it as one opaque node with a fake (shape-only) implementation instead of breaking the graph.
Imported on the first call of the Triton backend, never by `import diffkern`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _kernels():
    from diffkern.kernels.triton import attention as kernels

    return kernels


@torch.library.custom_op("diffkern::attention_triton_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, kp: Optional[Tensor], vp: Optional[Tensor],
                  bias: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _kernels().attention_forward(q, k, v, kp, vp, bias, causal, scale)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, kp, vp, bias, causal, scale):
    B, H, Sq, D = q.shape
    return q.new_empty((B, H, Sq, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("diffkern::attention_triton_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, kp: Optional[Tensor], vp: Optional[Tensor],
                  bias: Optional[Tensor], causal: bool, scale: float, out: Tensor, lse: Tensor,
                  need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dkp, dvp, dbias = _kernels().attention_backward(do, q, k, v, kp, vp, bias, causal, scale, out,
                                                                 lse, need_dbias=need_dbias)
    return dq, dk, dv, _or_placeholder(dkp, q), _or_placeholder(dvp, q), _or_placeholder(dbias, q)


def _or_placeholder(t, like):
    """t, or a fresh empty tensor standing for "no gradient". Fresh each time: a custom op's outputs may not
    alias each other, so one shared placeholder for dkp, dvp and dbias is refused (issue 11, defect 1)."""
    return like.new_empty(0) if t is None else t


@attention_bwd.register_fake
def _(do, q, k, v, kp, vp, bias, causal, scale, out, lse, need_dbias):
    dbias = None
    if need_dbias:
        dbias = q.new_empty((q.shape[0], q.shape[1], q.shape[2], k.shape[2] + (0 if kp is None else kp.shape[2])),
                            dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            _or_placeholder(None if kp is None else torch.empty_like(kp), q),
            _or_placeholder(None if vp is None else torch.empty_like(vp), q), _or_placeholder(dbias, q))


def _setup_context(ctx, inputs, output):
    q, k, v, kp, vp, bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kp, vp, bias, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, kp, vp, bias, out, lse = ctx.saved_tensors
    need_dbias = bool(ctx.needs_input_grad[5])
    dq, dk, dv, dkp, dvp, dbias = attention_bwd(dout, q, k, v, kp, vp, bias, ctx.causal, ctx.scale, out, lse,
                                                need_dbias)
    has_prefix = kp is not None
    return (dq, dk, dv, dkp if has_prefix else None, dvp if has_prefix else None,
            dbias.to(bias.dtype) if need_dbias else None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def run(c):
    """Run a validated attention call (diffkern.ops.attention._Call) on the Triton kernels."""
    B, H, Sq, _ = c.q.shape
    bias = c.bias
    if bias is not None:
        if bias.dtype == torch.bool:  # keep-mask -> additive, on the mask's own (broadcast) shape
            bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
        bias = bias.expand(B, H, Sq, c.total_keys)  # a view: stride 0 on broadcast dims
    out, _ = attention_fwd(c.q, c.k, c.v, c.kp, c.vp, bias, c.causal, c.scale)
    return out
