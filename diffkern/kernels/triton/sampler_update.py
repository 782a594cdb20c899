"""Triton sampler_update: one elementwise pass over (sample, model_output[, uncond], history...[, noise]).

Grid (cdiv(N, BLOCK), B), N = elements per sample: a program owns one block of one sample, so the
per-sample coefficients are scalars. H (the number of history tensors, at most 6) is a constexpr:
the unused pointer slots get a dummy and are never loaded. With STATS_ONLY the pass writes |d|
(unclipped) as float32 and nothing else (the statistics pass of dynamic thresholding).
"""

import triton
import triton.language as tl

# clamps keep NaN (tl.minimum / tl.maximum drop it by default): a NaN d stays NaN, never a bound
_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _history_term(acc, acc2, h_ptr, cp, J: tl.constexpr, H: tl.constexpr, AUX: tl.constexpr, base, offs, mask):
    """acc += c_J h_J (and acc2 += d_J h_J with AUX), skipping the load when both are zero."""
    c = tl.load(cp + 4 + J)
    if AUX:
        d = tl.load(cp + 7 + H + J)
    else:
        d = 0.0
    if (c != 0) | (d != 0):
        h = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        # each zero coefficient drops its own term: 0 * inf would be NaN (issue 22)
        if c != 0:
            acc += c * h
        if AUX:
            if d != 0:
                acc2 += d * h
    return acc, acc2


@triton.jit
def _sampler_update_kernel(
    x_ptr, m_ptr, u_ptr, noise_ptr,           # sample, model_output, uncond (or dummy), noise (or dummy)
    h0, h1, h2, h3, h4, h5,                   # history tensors (dummies past H)
    coeffs_ptr,                               # float32 (B, K): cx, cp, a, b, c_1..c_H, std(, a2, b2, d_1..d_H)
    thr_ptr,                                  # float32 (B,) dynamic thresholds (or dummy)
    out_ptr, d_ptr, aux_ptr,                  # outputs, x's dtype, contiguous (B, N); aux may be a dummy
    abs_ptr,                                  # float32 (B, N) |d| when STATS_ONLY (or dummy)
    N, K, guidance_scale, clip_range,
    H: tl.constexpr, CLIP: tl.constexpr,      # CLIP: 0 none, 1 static, 2 dynamic
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, AUX: tl.constexpr, STATS_ONLY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b * N
    cp = coeffs_ptr + b * K
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        un = tl.load(u_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        pred = un + guidance_scale * (pred - un)
    d = tl.load(cp) * x + tl.load(cp + 1) * pred
    if STATS_ONLY:
        tl.store(abs_ptr + base + offs, tl.abs(d), mask=mask)
    else:
        if CLIP == 1:
            d = tl.minimum(tl.maximum(d, -clip_range, propagate_nan=_NAN), clip_range, propagate_nan=_NAN)
        elif CLIP == 2:
            s = tl.load(thr_ptr + b)
            d = tl.minimum(tl.maximum(d, -s, propagate_nan=_NAN), s, propagate_nan=_NAN) / s
        out = tl.load(cp + 2) * x + tl.load(cp + 3) * d
        if AUX:
            aux = tl.load(cp + 5 + H) * x + tl.load(cp + 6 + H) * d
        else:
            aux = out
        if H > 0:
            out, aux = _history_term(out, aux, h0, cp, 0, H, AUX, base, offs, mask)
        if H > 1:
            out, aux = _history_term(out, aux, h1, cp, 1, H, AUX, base, offs, mask)
        if H > 2:
            out, aux = _history_term(out, aux, h2, cp, 2, H, AUX, base, offs, mask)
        if H > 3:
            out, aux = _history_term(out, aux, h3, cp, 3, H, AUX, base, offs, mask)
        if H > 4:
            out, aux = _history_term(out, aux, h4, cp, 4, H, AUX, base, offs, mask)
        if H > 5:
            out, aux = _history_term(out, aux, h5, cp, 5, H, AUX, base, offs, mask)
        if HAS_NOISE:
            std = tl.load(cp + 4 + H)
            if std != 0:
                out += std * tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + base + offs, d.to(d_ptr.dtype.element_ty), mask=mask)
        if AUX:
            tl.store(aux_ptr + base + offs, aux.to(aux_ptr.dtype.element_ty), mask=mask)


def sampler_update(call, x, m, u, noise, hist, coeffs, out, d, aux, thresholds, abs_out, block=None):
    """One pass over contiguous tensors (see diffkern.ops.sampler_update._kernel_runner)."""
    B = x.shape[0]
    N = x.numel() // B
    if block is None:
        block = 1024 if x.device.type == "cuda" else 256
    block = min(block, max(16, triton.next_power_of_2(N)))
    slots = list(hist) + [x] * (6 - len(hist))
    dummy = coeffs
    _sampler_update_kernel[(triton.cdiv(N, block), B)](  # axis 1 (samples): at most 65535
       
        x, m, u if u is not None else x, noise if noise is not None else x, *slots, coeffs,
        thresholds if thresholds is not None else dummy, out, d, aux if aux is not None else out,
        abs_out if abs_out is not None else dummy,
        N, coeffs.shape[1], call.guidance_scale, call.clip_range,
        H=len(hist), CLIP=("none", "static", "dynamic").index(call.clip), HAS_UNCOND=u is not None,
        HAS_NOISE=noise is not None, AUX=aux is not None, STATS_ONLY=abs_out is not None, BLOCK=block,
        num_warps=4)
