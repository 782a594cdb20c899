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


def guided_step(sample, model_output, coeffs, *, uncond_output=None, guidance_scale=1.0,
                prediction_type="epsilon", clip="none", clip_range=1.0, dynamic_percentile=0.995,
                dynamic_max_value=1.0, variance="fixed", noise=None, upcast=False):
    """CFG combine + x0/eps from the prediction type + clipping + DDPM/DDIM update (see
    diffkern.ops.guided_step); float32 math (float64 for float64 or upcast). -> (prev, x0)."""
    work = torch.float64 if (upcast or sample.dtype == torch.float64) else torch.float32
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
    if clip == "static":
        x0 = x0.clamp(-clip_range, clip_range)
    elif clip == "dynamic":  # diffusers' _threshold_sample
        s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), dynamic_percentile, dim=1)
        s = torch.clamp(s, min=1, max=dynamic_max_value).reshape((-1,) + (1,) * (x.dim() - 1))
        x0 = torch.clamp(x0, -s, s) / s
    if clip != "none" or prediction_type == "sample":
        eps = (x - sa * x0) / s1m
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
    return prev.to(out_dtype).contiguous(), x0.to(out_dtype).contiguous()


def dynamic_threshold(x, percentile=0.995, max_value=None, *, upcast=False):
    """Imagen dynamic thresholding (diffusers' DDPMScheduler._threshold_sample): per sample b,
    s = max(quantile(|x_b|, percentile, 'linear'), 1), min(s, max_value); clamp(x_b, -s, s) / s.
    Always float64 inside (returned in float64 if upcast, else in x's dtype); any n per sample
    (torch.quantile's 2^24 limit is lifted by kthvalue); a sample with a NaN comes out all NaN."""
    B = x.shape[0]
    a = x.reshape(B, -1).double()
    mag = a.abs()
    n = mag.shape[1]
    if n <= 1 << 24:
        s = torch.quantile(mag, percentile, dim=1)
    else:  # torch.quantile refuses > 2^24 elements: the same two order statistics by kthvalue
        pos = percentile * (n - 1)
        lo, hi = int(pos // 1), min(int(-(-pos // 1)), n - 1)
        v_lo = mag.kthvalue(lo + 1, dim=1).values
        v_hi = mag.kthvalue(hi + 1, dim=1).values
        s = torch.where(v_lo == v_hi, v_lo, v_lo + (pos - lo) * (v_hi - v_lo))
    s = torch.where(torch.isnan(mag).any(1), torch.full_like(s, float("nan")), s)
    s = s.clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.unsqueeze(1)
    y = (torch.clamp(a, -s, s) / s).reshape(x.shape)
    return y if upcast else y.to(x.dtype)
