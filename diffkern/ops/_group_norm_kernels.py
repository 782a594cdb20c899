"""group_norm's kernel entry points and their shared PyTorch backward: the layer below both the
public op (diffkern.ops.group_norm) and its torch.library custom op (diffkern.ops._group_norm_op),
so that neither imports the other's module back."""

from __future__ import annotations

import torch

from diffkern import _ext


def is_channels_last_like(x):
    """x's strides are those of (N, *spatial, C) storage (channels_last / channels_last_3d / 3-D)."""
    N, C = x.shape[:2]
    if x.stride(1) != 1 and C != 1:
        return False
    expected = C
    for d in range(x.dim() - 1, 1, -1):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return N <= 1 or x.stride(0) == expected


def _view_ncs(x):
    N, C = x.shape[:2]
    S = x.numel() // max(N * C, 1)
    if x.is_contiguous():
        return x.view(N, C, S)
    return x.as_strided((N, C, S), (C * S, 1, C))


def dense(x):
    """x itself when a kernel takes its layout (contiguous or channels-last-like), else a contiguous copy."""
    return x if (x.is_contiguous() or is_channels_last_like(x)) else x.contiguous()


def _contig(t):
    return None if t is None else t.contiguous()


# The fused activations, by the name ops.group_norm takes, and the code the kernels take
# (GroupNormArgs::activation in csrc/group_norm_args.h, ACT in the Triton kernels).
ACTIVATION_CODES = {None: 0, "silu": 1, "gelu": 2, "gelu_tanh": 3}


def activation_code(activation):
    """The kernels' code of an activation name (None, "silu", "gelu", "gelu_tanh"); a code passes
    through, and a bool is the old `silu` flag (True = "silu"), kept for callers of the entry points."""
    if activation is True or activation is False:
        activation = "silu" if activation else None
    if isinstance(activation, int) and activation in ACTIVATION_CODES.values():
        return activation
    try:
        return ACTIVATION_CODES[activation]
    except (KeyError, TypeError):
        raise ValueError(f"group_norm: activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}") from None


def activation_name(activation):
    """The name of an activation given by name or by the old bool `silu` flag."""
    return {v: k for k, v in ACTIVATION_CODES.items()}[activation_code(activation)]


# Kernel entry points: (x, G, weight, bias, scale, shift, eps, activation, out=None) -> (y, mean, rstd).
# activation: None, "silu", "gelu" or "gelu_tanh" (a bool still means SiLU on / off).
# `out`, when given, must have the strides of dense(x); tests pass a NaN-poisoned one.

def _run_triton(x, num_groups, weight, bias, scale, shift, eps, activation, out=None):
    from diffkern.kernels.triton import group_norm as tgn

    x = dense(x)
    y = out if out is not None else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if y.stride() != x.stride() or y.shape != x.shape:
        raise ValueError("group_norm: out must have the shape and strides of x")
    c = _contig
    mean, rstd = tgn.group_norm_forward(_view_ncs(x), num_groups, c(weight), c(bias), c(scale), c(shift),
                                        eps, activation_code(activation), _view_ncs(y))
    return y, mean, rstd


def _run_compiled(x, num_groups, weight, bias, scale, shift, eps, activation, out=None):
    c = _contig
    y, mean, rstd = _ext.extension().group_norm_forward(dense(x), num_groups, c(weight), c(bias), c(scale),
                                                        c(shift), eps, activation_code(activation), out)
    return y, mean, rstd


# forward kernels of the kernel backends, by backend name
FORWARD_KERNELS = {"cpu": _run_compiled, "cuda": _run_compiled, "triton": _run_triton}


_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_GELU_K, _GELU_C = 0.7978845608028654, 0.044715  # sqrt(2 / pi), the tanh form's cubic coefficient


def _expand_groups(t, xg):
    """(N, G) -> (N, G, 1, ...) to broadcast against x viewed as (N, G, C/G, *spatial)."""
    return t.reshape(t.shape + (1,) * (xg.dim() - 2))


def backward(ctx, dy):
    """Gradients (x, weight, bias, scale, shift, None x 4) from ctx.saved_tensors = (x, weight, bias,
    scale, shift, mean, rstd), ctx.num_groups, ctx.activation and ctx.needs_input_grad, in float32."""
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    G, act = ctx.num_groups, activation_name(ctx.activation)
    N, C = x.shape[:2]
    f32 = torch.float32
    xg = x.to(f32).reshape(N, G, C // G, *x.shape[2:])
    xhat = ((xg - _expand_groups(mean, xg)) * _expand_groups(rstd, xg)).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.dim() - 2)
    w = weight.to(f32).view(bshape) if weight is not None else None
    u = xhat * w if w is not None else xhat
    if bias is not None:
        u = u + bias.to(f32).view(bshape)
    dv = dy.to(f32)
    if scale is not None:
        s1 = 1 + scale.to(f32).view(N, C, *bshape[2:])
        v = u * s1 + shift.to(f32).view(N, C, *bshape[2:])
    else:
        v = u
    if act == "silu":
        sig = torch.sigmoid(v)
        dv = dv * sig * (1 + v * (1 - sig))
    elif act == "gelu":  # d/dv v Phi(v) = Phi(v) + v phi(v)
        cdf = 0.5 * (1 + torch.erf(v * _SQRT1_2))
        dv = dv * (cdf + v * torch.exp(-0.5 * v * v) * _INV_SQRT_2PI)
    elif act == "gelu_tanh":  # d/dv 0.5 v (1 + tanh(u)), u = k (v + c v^3)
        th = torch.tanh(_GELU_K * (v + _GELU_C * v * v * v))
        dv = dv * (0.5 * (1 + th) + 0.5 * v * (1 - th * th) * _GELU_K * (1 + 3 * _GELU_C * v * v))
    red = tuple(range(2, x.dim()))
    g_x = g_w = g_b = g_scale = g_shift = None
    if scale is not None:
        if ctx.needs_input_grad[3]:
            g_scale = (dv * u).sum(red).to(scale.dtype) if red else (dv * u).to(scale.dtype)
        if ctx.needs_input_grad[4]:
            g_shift = (dv.sum(red) if red else dv).to(shift.dtype)
        du = dv * s1
    else:
        du = dv
    if weight is not None and ctx.needs_input_grad[1]:
        g_w = (du * xhat).sum((0,) + red).to(weight.dtype)
    if bias is not None and ctx.needs_input_grad[2]:
        g_b = du.sum((0,) + red).to(bias.dtype)
    if ctx.needs_input_grad[0]:
        dxhat = du * w if w is not None else du
        dg = dxhat.reshape(N, G, -1)
        xh = xhat.reshape(N, G, -1)
        m1 = dg.mean(-1, keepdim=True)
        m2 = (dg * xh).mean(-1, keepdim=True)
        g_x = (rstd.unsqueeze(-1) * (dg - m1 - xh * m2)).reshape(x.shape).to(x.dtype)
    return g_x, g_w, g_b, g_scale, g_shift, None, None, None, None
