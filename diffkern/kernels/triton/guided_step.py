"""Triton guided_step: one elementwise pass over (sample, model_output[, uncond][, noise]).

Grid (cdiv(N, BLOCK), B), N = C * spatial: a program owns one block of one sample, so the per-sample
coefficients are scalars. With STATS_ONLY the pass writes |unclipped x0| as float32 and nothing else
(the statistics pass of dynamic thresholding); the host then picks the per-sample thresholds.
With SEEDED the noise is drawn in the kernel: Philox4x32-10 (tl.philox) on the counter
(lo32(i), hi32(i), 0, 0) of flat index i = offset + b * N + j, Box-Muller of its first two words,
exactly as csrc/philox.h and diffkern.kernels.reference.philox_normal.
"""

import triton
import triton.language as tl

# clamps keep NaN (tl.minimum / tl.maximum drop it by default): a NaN prediction stays NaN
_NAN = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def _philox_normal(seed, index):
    """Normal number `index` (int64 block) of stream `seed`: see csrc/philox.h."""
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, _, _ = tl.philox(seed, c0, c1, zero, zero)
    u1 = ((w0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    u2 = (w1 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _guided_step_kernel(
    x_ptr, m_ptr, u_ptr, noise_ptr,   # sample, model_output, uncond (or dummy), noise (or dummy)
    coeffs_ptr,                       # float32 (B, K): sa, s1m, c_x0, c_xt, c_eps, sigma(, min_log, max_log)
    thr_ptr,                          # float32 (B,) dynamic thresholds s (or dummy)
    prev_ptr, x0_ptr,                 # outputs, x's dtype, contiguous (B, N)
    abs_ptr,                          # float32 (B, N) |x0| when STATS_ONLY (or dummy)
    N, M_STRIDE, K, guidance_scale, clip_range,   # M_STRIDE: elements per sample of model_output
    seed, noise_offset,               # SEEDED: Philox key and the stream position of element 0
    PRED: tl.constexpr,               # 0 epsilon, 1 sample, 2 v_prediction
    CLIP: tl.constexpr,               # 0 none, 1 static, 2 dynamic
    LEARNED: tl.constexpr, HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, SEEDED: tl.constexpr,
    STATS_ONLY: tl.constexpr, EPS_FROM_CLIPPED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    cp = coeffs_ptr + b * K
    sa = tl.load(cp)
    s1m = tl.load(cp + 1)
    x = tl.load(x_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    pred = tl.load(m_ptr + b * M_STRIDE + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        un = tl.load(u_ptr + b * M_STRIDE + offs, mask=mask, other=0.0).to(tl.float32)
        pred = un + guidance_scale * (pred - un)
    if PRED == 0:
        x0 = (x - s1m * pred) / sa
    elif PRED == 1:
        x0 = pred
    else:
        x0 = sa * x - s1m * pred
    x0_raw = x0
    if STATS_ONLY:
        tl.store(abs_ptr + b * N + offs, tl.abs(x0), mask=mask)
    else:
        if CLIP == 1:
            x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=_NAN), clip_range, propagate_nan=_NAN)
        elif CLIP == 2:
            s = tl.load(thr_ptr + b)
            x0 = tl.minimum(tl.maximum(x0, -s, propagate_nan=_NAN), s, propagate_nan=_NAN) / s
        c_x0 = tl.load(cp + 2)
        c_xt = tl.load(cp + 3)
        c_eps = tl.load(cp + 4)
        out = c_x0 * x0 + c_xt * x
        if c_eps != 0:
            if PRED == 1 or (CLIP != 0 and EPS_FROM_CLIPPED):
                if EPS_FROM_CLIPPED:
                    eps = (x - sa * x0) / s1m
                else:
                    eps = (x - sa * x0_raw) / s1m
            elif PRED == 0:
                eps = pred
            else:
                eps = sa * pred + s1m * x
            out += c_eps * eps
        if HAS_NOISE or SEEDED:
            if SEEDED:
                nz = _philox_normal(seed, noise_offset + b * N + offs)
            else:
                nz = tl.load(noise_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
            if LEARNED:
                v = tl.load(m_ptr + b * M_STRIDE + N + offs, mask=mask, other=0.0).to(tl.float32)
                frac = (v + 1.0) * 0.5
                log_var = frac * tl.load(cp + 7) + (1.0 - frac) * tl.load(cp + 6)
                std = tl.exp(0.5 * log_var)
            else:
                std = tl.load(cp + 5)
            out += std * nz
        tl.store(prev_ptr + b * N + offs, out.to(prev_ptr.dtype.element_ty), mask=mask)
        tl.store(x0_ptr + b * N + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def guided_step(call, x, m, u, noise, coeffs, prev, x0, thresholds, abs_out, block=None):
    """One pass over contiguous tensors (see diffkern.ops.guided_step._kernel_runner)."""
    B = x.shape[0]
    N = x.numel() // B
    if block is None:
        block = 1024 if x.device.type == "cuda" else 256
    block = min(block, max(16, triton.next_power_of_2(N)))
    dummy = coeffs
    grid = (triton.cdiv(N, block), B)  # blocks on axis 0 (up to 2^31 - 1), samples on axis 1 (65535)
    _guided_step_kernel[grid](
        x, m, u if u is not None else x, noise if noise is not None else x, coeffs,
        thresholds if thresholds is not None else dummy, prev, x0,
        abs_out if abs_out is not None else dummy,
        N, m.numel() // B, coeffs.shape[1], call.guidance_scale, call.clip_range,
        call.noise_seed if call.noise_seed is not None else 0, call.noise_offset,
        PRED=("epsilon", "sample", "v_prediction").index(call.prediction_type),
        CLIP=("none", "static", "dynamic").index(call.clip),
        LEARNED=call.variance == "learned_range", HAS_UNCOND=u is not None, HAS_NOISE=noise is not None, SEEDED=call.noise_seed is not None,
        STATS_ONLY=abs_out is not None, EPS_FROM_CLIPPED=call.eps_from_clipped, BLOCK=block, num_warps=4)
