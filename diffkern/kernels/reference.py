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


def attention(q, k, v, *, attn_bias=None, causal=False, scale=None, kv_prefix=None, upcast=False):
    """softmax(q k^T * scale + bias) v with float32 (float64 if upcast) scores and softmax.

    kv_prefix=(kp, vp) keys/values come before k/v and are always visible; causal lets query i see
    main key j <= i (top-left). attn_bias: additive float, or bool keep-mask (True = attend),
    broadcastable to (B, H, Sq, Sp + Sk). Rows with every key masked give zeros."""
    out_dtype = q.dtype
    work = torch.float64 if (upcast or q.dtype == torch.float64) else torch.float32
    if kv_prefix is not None:
        k = torch.cat([kv_prefix[0], k], dim=2)
        v = torch.cat([kv_prefix[1], v], dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device)
    if causal:
        sq, skt = s.shape[-2:]
        sp = 0 if kv_prefix is None else kv_prefix[0].shape[2]
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(skt, device=s.device)[None, :]
        keep = (j < sp) | (j - sp <= i)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            keep = keep & attn_bias
        else:
            s = s + attn_bias.to(work)
    s = s.masked_fill(~keep, float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    out = torch.matmul(p, v.to(work))
    return out if upcast else out.to(out_dtype)
