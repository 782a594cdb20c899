"""Plain-PyTorch references: the truth for tests (with upcast=True, in float64) and the baseline
for benchmarks (eager PyTorch, exactly what a user would write)."""

import math

import torch
import torch.nn.functional as F


def _per_channel(t, x):
    """(N, C) -> (N, C, 1, ..., 1) broadcastable against x."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _gn_backward_crashes(x, weight, bias):
    if x.device.type != "cpu" or x.dim() not in (4, 5) or x.is_contiguous() or not torch.is_grad_enabled():
        return False
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return (x.is_contiguous(memory_format=fmt) and not x.requires_grad
            and any(t is not None and t.requires_grad for t in (weight, bias)))


def _group_shift(x, num_groups):
    """(N, C, 1, ...) tensor holding, for every channel, the first element of its (sample, group)."""
    N, C = x.shape[:2]
    first = x.detach()[(slice(None), slice(None, None, C // num_groups)) + (0,) * (x.dim() - 2)]
    return first.repeat_interleave(C // num_groups, dim=1).reshape((N, C) + (1,) * (x.dim() - 2))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, scale=None, shift=None,
               activation=None, upcast=False, shifted=False):
    """act((GroupNorm(x) * weight + bias) * (1 + scale) + shift); float64 throughout if upcast.

    activation: None, "silu", "gelu" or "gelu_tanh" (F.gelu(approximate="tanh")).
    shifted: normalise x - K, K = the first element of each (sample, group) (GroupNorm does not see a
    per-group constant; K is detached, its true gradient being 0). Eager PyTorch's channels_last
    GroupNorm accumulates E[x^2] - E[x]^2 in one pass and loses every digit when |mean| >> std
    (x = 1000 + randn, float32: max error ~1e3 at (2, 64, 24, 24)); shifted keeps it ~1e-6. 16-bit
    inputs are then computed in float32 (x - K can overflow float16) and rounded once at the end. The
    reference backend of ops.group_norm sets it; the default (False) is eager PyTorch as a user
    writes it, the benchmarks' baseline."""
    out_dtype = None
    if upcast:
        x, weight, bias, scale, shift = (None if t is None else t.double()
                                         for t in (x, weight, bias, scale, shift))
    if shifted and x.numel() > 0 and x.dtype != torch.float64:
        if x.dtype != torch.float32:
            out_dtype = x.dtype
            x, weight, bias, scale, shift = (None if t is None else t.float()
                                             for t in (x, weight, bias, scale, shift))
        x = x - _group_shift(x, num_groups)  # keeps x's memory format
    if _gn_backward_crashes(x, weight, bias):
        # torch 2.13's CPU channels_last GroupNorm backward segfaults when weight or bias needs a
        # gradient and x does not (tests/ops/test_group_norm_combinations.py found it): normalise a
        # contiguous copy and hand back x's memory format.
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        y = F.group_norm(x.contiguous(), num_groups, weight, bias, eps).contiguous(memory_format=fmt)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (1 + _per_channel(scale, x)) + _per_channel(shift, x)
    if activation == "silu":
        y = F.silu(y)
    elif activation in ("gelu", "gelu_tanh"):
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    elif activation is not None:
        raise ValueError(f"group_norm: activation must be None, 'silu', 'gelu' or 'gelu_tanh', got {activation!r}")
    return y if out_dtype is None else y.to(out_dtype)


def attention(q, k, v, *, attn_bias=None, causal=False, scale=None, kv_prefix=None, upcast=False):
    """softmax(q k^T * scale + bias) v with float32 (float64 if upcast) scores and softmax.

    kv_prefix=(kp, vp) keys/values come before k/v and are always visible; causal lets query i see
    main key j <= i (top-left). attn_bias: additive float, or bool keep-mask (True = attend),
    broadcastable to (B, H, Sq, Sp + Sk). Rows with every key masked give zeros. A -inf bias entry
    masks its key whatever the score (a NaN score there does not leak), and a NaN or Inf input reaches
    every output it feeds (see diffkern.ops.attention for the whole rule)."""
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
            # -inf entries are masks: keep them out of the scores, where NaN + -inf would be NaN
            keep = keep & ~torch.isneginf(attn_bias)
            s = s + attn_bias.to(work)
    s = s.masked_fill(~keep, float("-inf"))
    dead = torch.isneginf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    # zero fully masked rows after the product too: 0 * NaN from a masked value would be NaN there
    out = torch.matmul(p, v.to(work)).masked_fill(dead, 0.0)
    return out if upcast else out.to(out_dtype)


_M32 = 0xFFFFFFFF


def _mul32(a, b):
    """(hi, lo) 32-bit words of a * b for int64 tensors / ints in [0, 2^32), without int64 overflow."""
    ah, al, bh, bl = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh + ((al * bl) >> 16)
    return ah * bh + (mid >> 16), ((mid & 0xFFFF) << 16) | ((al * bl) & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC 2011) on int64 tensors holding uint32 words -> 4 words."""
    for _ in range(10):
        hi0, lo0 = _mul32(c0, 0xD2511F53)
        hi2, lo2 = _mul32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_normal(seed, index, dtype=torch.float32):
    """Standard normals number `index` (int64 tensor) of stream `seed`, as every guided_step backend
    draws them (csrc/philox.h): Philox on counter (lo32(i), hi32(i), 0, 0), key (lo32(seed),
    hi32(seed)); Box-Muller of u1 = ((w0 >> 8) + 1) / 2^24, u2 = (w1 >> 8) / 2^24."""
    zero = torch.zeros_like(index)
    w0, w1, _, _ = philox4x32_10(index & _M32, index >> 32, zero, zero, seed & _M32, seed >> 32)
    u1 = ((w0 >> 8) + 1).to(dtype) * 2.0 ** -24
    u2 = (w1 >> 8).to(dtype) * 2.0 ** -24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def seeded_noise(shape, seed, offset=0, device=None, dtype=torch.float32):
    """The noise tensor guided_step draws for noise_seed=seed, noise_offset=offset: element with
    flat (row-major) index i is philox_normal(seed, offset + i)."""
    n = math.prod(shape)
    index = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return philox_normal(seed, index, dtype).reshape(shape)


def row_quantile(mag, q):
    """Per row, the q quantile of mag (B, n) with torch.quantile's 'linear' rule, as every kernel backend
    computes it: position pos = q * (n - 1) in float64, order statistics of ranks floor(pos) and
    ceil(pos), s = v_lo + (pos - lo) * (v_hi - v_lo) in float64 (s = v_lo when the weight is 0 or both
    are equal), returned in mag's dtype. Unlike torch.quantile: no 0 * inf NaN when an order statistic
    is inf and the weight is 0 or the two are equal (inf when v_hi = inf and the weight is > 0: torch's
    lerp gives NaN there for weights >= 0.5), and any n (torch.quantile stops at 2^24). A row holding a
    NaN gives NaN, as torch.quantile does."""
    n = mag.shape[1]
    pos = float(q) * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(int(math.ceil(pos)), n - 1)
    w = pos - lo
    v_lo = mag.kthvalue(lo + 1, dim=1).values.double()
    v_hi = mag.kthvalue(hi + 1, dim=1).values.double()
    s = v_lo if (hi == lo or w == 0.0) else torch.where(v_lo == v_hi, v_lo, v_lo + w * (v_hi - v_lo))
    s = torch.where(torch.isnan(mag).any(1), torch.full_like(s, float("nan")), s)
    return s.to(mag.dtype)


def guided_step(sample, model_output, coeffs, *, uncond_output=None, guidance_scale=1.0,
                prediction_type="epsilon", clip="none", clip_range=1.0, dynamic_percentile=0.995,
                dynamic_max_value=1.0, variance="fixed", noise=None, noise_seed=None, noise_offset=0,
                eps_from_clipped=True, upcast=False):
    """CFG combine + x0/eps from the prediction type + clipping + DDPM/DDIM update (see
    diffkern.ops.guided_step); float32 math (float64 for float64 or upcast). -> (prev, x0)."""
    work = torch.float64 if (upcast or sample.dtype == torch.float64) else torch.float32
    if noise_seed is not None:
        noise = seeded_noise(sample.shape, noise_seed, noise_offset, sample.device, work)
    out_dtype = work if upcast else sample.dtype
    x, m = sample.to(work), model_output.to(work)
    C = x.shape[1]
    pred = m[:, :C]
    if uncond_output is not None:
        u = uncond_output.to(work)[:, :C]
        pred = u + guidance_scale * (pred - u)
    k = coeffs.to(work).reshape(coeffs.shape + (1,) * (x.dim() - 2)).unbind(1)
    sa, s1m, c_x0, c_xt, c_eps, sigma = (t.unsqueeze(1) for t in k[:6])
    if prediction_type == "epsilon":
        x0 = (x - s1m * pred) / sa
    elif prediction_type == "sample":
        x0 = pred
    else:  # v_prediction
        x0 = sa * x - s1m * pred
    x0_raw = x0
    if clip == "static":
        x0 = x0.clamp(-clip_range, clip_range)
    elif clip == "dynamic":  # diffusers' _threshold_sample
        s = row_quantile(x0.abs().reshape(x0.shape[0], -1), dynamic_percentile)
        s = torch.clamp(s, min=1, max=dynamic_max_value).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.clamp(x0, -s, s) / s
    if prediction_type == "sample" or (clip != "none" and eps_from_clipped):
        eps = (x - sa * (x0 if eps_from_clipped else x0_raw)) / s1m
    elif prediction_type == "epsilon":
        eps = pred
    else:
        eps = sa * pred + s1m * x
    # a zero c_eps drops the term (eps may be inf where s1m == 0)
    prev = c_x0 * x0 + c_xt * x + torch.where(c_eps != 0, c_eps * eps, 0)
    if noise is not None:
        if variance == "learned_range":
            frac = (m[:, C:] + 1) / 2
            log_var = frac * k[7].unsqueeze(1) + (1 - frac) * k[6].unsqueeze(1)
            std = torch.exp(0.5 * log_var)
        else:
            std = sigma
        prev = prev + std * noise.to(work)
    # fresh outputs: x0 = pred can be a view of model_output ("sample" prediction, no clipping)
    return prev.to(out_dtype).contiguous(), x0.to(out_dtype, copy=True).contiguous()


def dynamic_threshold(x, percentile=0.995, max_value=None, *, upcast=False):
    """Imagen dynamic thresholding (diffusers' DDPMScheduler._threshold_sample): per sample b,
    s = max(quantile(|x_b|, percentile, 'linear'), 1), min(s, max_value); clamp(x_b, -s, s) / s.
    Always float64 inside (returned in float64 if upcast, else in x's dtype); any n per sample
    (torch.quantile's 2^24 limit is lifted by kthvalue); a sample with a NaN comes out all NaN."""
    B = x.shape[0]
    a = x.reshape(B, -1).double()
    s = row_quantile(a.abs(), percentile)
    s = s.clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.unsqueeze(1)
    y = (torch.clamp(a, -s, s) / s).reshape(x.shape)
    # contiguous as the op promises (a transposed x would otherwise hand its strides on)
    return (y if upcast else y.to(x.dtype)).contiguous()
