"""Triton GroupNorm (+ scale-shift) (+ SiLU) forward.

Two launches over a (N * G, SPLITS) grid; each program owns one chunk of spatial positions of one
group (all its channels):
  1. _stats_kernel: the chunk's (mean, M2) partial, from tiles reduced exactly in registers and
     merged with Chan's formula, after subtracting a per-group shift (the group's first element) so
     that |mean| >> std costs no precision.
  2. _apply_kernel: merges the group's partials (Chan again), writes mean/rstd once per group, and
     applies y = act((x - mean) * A[c] + B[c]) to its chunk, A and B folding rstd, affine and
     scale-shift (x - mean first: folding mean into B would cancel catastrophically when |mean| >> std).
x is read twice; at diffusion sizes the second read mostly hits L2. Element (n, c, s) is at
n * stride_n + c * stride_c + s * stride_s, which covers contiguous and channels_last inputs.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(
    x_ptr,            # input, (N, C, S) with the strides below
    part_ptr,         # float32 (N * G, SPLITS, 2): per chunk (mean, M2) of x - shift
    C, S, CPG,        # channels, flattened spatial size, channels per group
    stride_n, stride_c, stride_s,
    chunk_s,          # spatial positions per chunk
    SPLITS,           # chunks per group
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = x_ptr + n * stride_n + c0 * stride_c
    shift = tl.load(base).to(tl.float32)
    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for cb in range(0, CPG, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        for sb in range(s_begin, s_end, BLOCK_S):
            offs_s = sb + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_end)[None, :]
            ptrs = base + offs_c[:, None].to(tl.int64) * stride_c + offs_s[None, :].to(tl.int64) * stride_s
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift
            t_cnt = tl.sum(mask.to(tl.float32))
            t_mean = tl.sum(tl.where(mask, v, 0.0)) / t_cnt
            d = tl.where(mask, v - t_mean, 0.0)
            t_m2 = tl.sum(d * d)
            tot = cnt + t_cnt
            delta = t_mean - mean
            mean = mean + delta * (t_cnt / tot)
            m2 = m2 + t_m2 + delta * delta * (cnt * t_cnt / tot)
            cnt = tot
    out = part_ptr + (ng * SPLITS + split) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr,                 # input and output, same strides
    w_ptr, b_ptr,                 # (C,) or dummies when HAS_AFFINE is False
    scale_ptr, shift_ptr,         # (N, C) contiguous, or dummies when HAS_SCALE_SHIFT is False
    part_ptr,                     # float32 (N * G, SPLITS, 2) from _stats_kernel
    mean_ptr, rstd_ptr,           # float32 (N * G,) outputs
    C, S, CPG,
    stride_n, stride_c, stride_s,
    chunk_s, SPLITS, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr, SPLITS_P2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = n * stride_n + c0 * stride_c
    shift0 = tl.load(x_ptr + base).to(tl.float32)

    # merge the group's partials; chunk i holds min(chunk_s, S - i * chunk_s) * CPG elements
    idx = tl.arange(0, SPLITS_P2)
    pmask = idx < SPLITS
    p_cnt = tl.where(pmask, tl.minimum(chunk_s, S - idx * chunk_s).to(tl.float32) * CPG, 0.0)
    p_mean = tl.load(part_ptr + (ng * SPLITS + idx) * 2, mask=pmask, other=0.0)
    p_m2 = tl.load(part_ptr + (ng * SPLITS + idx) * 2 + 1, mask=pmask, other=0.0)
    total = tl.sum(p_cnt)
    g_mean = tl.sum(p_cnt * p_mean) / total
    dev = p_mean - g_mean
    g_m2 = tl.sum(p_m2 + p_cnt * dev * dev)
    var = tl.maximum(g_m2 / total, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    mean = g_mean + shift0
    if split == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)

    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    for cb in range(0, CPG, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        ch = c0 + offs_c
        a = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
        if HAS_WEIGHT:
            a = a * tl.load(w_ptr + ch, mask=mask_c, other=1.0).to(tl.float32)
        b = tl.zeros([BLOCK_C], tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_SCALE_SHIFT:
            sc = 1.0 + tl.load(scale_ptr + n * C + ch, mask=mask_c, other=0.0).to(tl.float32)
            sh = tl.load(shift_ptr + n * C + ch, mask=mask_c, other=0.0).to(tl.float32)
            a = a * sc
            b = b * sc + sh
        for sb in range(s_begin, s_end, BLOCK_S):
            offs_s = sb + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_end)[None, :]
            offs = base + offs_c[:, None].to(tl.int64) * stride_c + offs_s[None, :].to(tl.int64) * stride_s
            v = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * a[:, None] + b[:, None]
            if SILU:
                v = v * tl.sigmoid(v)
            tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def _num_programs_target(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the CPU interpreter runs programs one after another: fewest is fastest


def _launch_config(N, C, S, G, device):
    cpg = C // G
    block_c = min(triton.next_power_of_2(cpg), 64)
    block_s = max(16, min(triton.next_power_of_2(S), 4096 // block_c))
    splits = max(1, min(triton.cdiv(_num_programs_target(device), N * G), triton.cdiv(S, block_s), 64))
    chunk_s = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    splits = triton.cdiv(S, chunk_s)
    num_warps = 8 if block_c * block_s >= 4096 else 4
    return block_c, block_s, splits, chunk_s, num_warps


def group_norm_forward(x3, num_groups, weight, bias, scale, shift, eps, silu, y3):
    """Launch on x3/y3 viewed as (N, C, S) (any strides, shared by both). Returns (mean, rstd), (N, G) fp32."""
    N, C, S = x3.shape
    G = num_groups
    mean = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    block_c, block_s, splits, chunk_s, num_warps = _launch_config(N, C, S, G, x3.device)
    part = torch.empty((N * G, splits, 2), device=x3.device, dtype=torch.float32)
    sn, sc, ss = x3.stride()
    grid = (N * G, splits)
    _stats_kernel[grid](x3, part, C, S, C // G, sn, sc, ss, chunk_s, splits,
                        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    dummy = x3
    _apply_kernel[grid](
        x3, y3,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        part, mean, rstd,
        C, S, C // G, sn, sc, ss, chunk_s, splits, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE_SHIFT=scale is not None,
        SILU=silu, SPLITS_P2=triton.next_power_of_2(splits),
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps,
    )
    return mean, rstd
