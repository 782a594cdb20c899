"""Triton GroupNorm (+ scale-shift) (+ SiLU) forward.

Programs own a (group, chunk of spatial positions) pair: grid (N * G, SPLITS). Element (n, c, s) is
at n * stride_n + c * stride_c + s * stride_s, so contiguous and channels_last inputs share the code.

Statistics: per-lane Welford over tiles of x - K (K = the group's first element, so |mean| >> std
costs no precision), lanes merged with Chan's formula at the end; chunks merged with Chan again.
Apply: y = act(((x - K) - (mean - K)) * A[c] + B[c]), A and B folding rstd, affine and scale-shift.
Subtracting first (and around K, held exactly) keeps full precision when |mean| >> std; folding the
mean into B would cancel catastrophically.

Launch plans:
- SPLITS == 1 (enough groups to fill the GPU, or the CPU interpreter): one fused kernel, each
  program computes its group's statistics then applies them; the second read of the group mostly
  hits L2 because the same program has just read it.
- SPLITS > 1 (few groups, e.g. batch 2): _stats_kernel writes per-chunk partials, _apply_kernel
  merges them and applies.
"""

import torch
import triton
import triton.language as tl

# A NaN variance (a NaN or +-inf in the group) must reach the output: tl.maximum's default drops NaN
# (max(NaN, 0) = 0 on GPUs and in the interpreter), which would hide it behind rstd = 1/sqrt(eps).
_NAN: tl.constexpr = tl.PropagateNan.ALL


@triton.jit
def _chunk_stats(x_ptr, base, shift, s_begin, s_end, CPG, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of x - shift over the group's channels and spatial range [s_begin, s_end)."""
    cnt = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for cb in range(0, CPG, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        for sb in range(s_begin, s_end, BLOCK_S):
            offs_s = sb + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_end)[None, :]
            ptrs = x_ptr + base + offs_c[:, None].to(tl.int64) * stride_c + offs_s[None, :].to(tl.int64) * stride_s
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift
            cnt_new = cnt + mask.to(tl.float32)
            delta = v - mean
            mean = mean + tl.where(mask, delta / tl.maximum(cnt_new, 1.0), 0.0)
            m2 = m2 + tl.where(mask, delta * (v - mean), 0.0)
            cnt = cnt_new
    total = tl.sum(tl.sum(cnt, axis=1), axis=0)
    g_mean = tl.sum(tl.sum(cnt * mean, axis=1), axis=0) / tl.maximum(total, 1.0)
    d = tl.where(cnt > 0, mean - g_mean, 0.0)
    g_m2 = tl.sum(tl.sum(m2 + cnt * d * d, axis=1), axis=0)
    return total, g_mean, g_m2


@triton.jit
def _channel_coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, ch, mask_c, rstd,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr):
    """(A, B) of y = act((x - mean) * A + B) for channels `ch` of sample n; rstd per channel."""
    a = rstd
    if HAS_WEIGHT:
        a = a * tl.load(w_ptr + ch, mask=mask_c, other=1.0).to(tl.float32)
    b = tl.zeros_like(a)
    if HAS_BIAS:
        b = tl.load(b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    if HAS_SCALE_SHIFT:
        sc = 1.0 + tl.load(scale_ptr + n * C + ch, mask=mask_c, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + n * C + ch, mask=mask_c, other=0.0).to(tl.float32)
        a = a * sc
        b = b * sc + sh
    return a, b


@triton.jit
def _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG,
                 stride_c, stride_s, s_begin, s_end, shift, m, rstd,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
                 SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    for cb in range(0, CPG, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        a, b = _channel_coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c0 + offs_c, mask_c,
                                     tl.full([BLOCK_C], 1.0, tl.float32) * rstd,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT)
        for sb in range(s_begin, s_end, BLOCK_S):
            offs_s = sb + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_end)[None, :]
            offs = base + offs_c[:, None].to(tl.int64) * stride_c + offs_s[None, :].to(tl.int64) * stride_s
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = ((xv - shift) - m) * a[:, None] + b[:, None]
            if SILU:
                v = v * tl.sigmoid(v)
            tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_kernel(
    x_ptr, y_ptr,              # input and output, same strides
    w_ptr, b_ptr,              # (C,), or dummies when HAS_WEIGHT / HAS_BIAS are False
    scale_ptr, shift_ptr,      # (N, C) contiguous, or dummies when HAS_SCALE_SHIFT is False
    mean_ptr, rstd_ptr,        # float32 (N * G,) outputs
    C, S, CPG,                 # channels, flattened spatial size, channels per group
    stride_n, stride_c, stride_s, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = n * stride_n + c0 * stride_c
    shift = tl.load(x_ptr + base).to(tl.float32)
    total, m, m2 = _chunk_stats(x_ptr, base, shift, 0, S, CPG, stride_c, stride_s, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt(tl.maximum(m2 / total, 0.0, propagate_nan=_NAN) + eps)
    tl.store(mean_ptr + ng, m + shift)
    tl.store(rstd_ptr + ng, rstd)
    _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG, stride_c, stride_s,
                 0, S, shift, m, rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT, SILU, BLOCK_C, BLOCK_S)


@triton.jit
def _stats_kernel(
    x_ptr,                     # input
    part_ptr,                  # float32 (N * G, SPLITS, 2): per chunk (mean of x - K, M2)
    C, S, CPG, stride_n, stride_c, stride_s,
    chunk_s, SPLITS,           # spatial positions per chunk, chunks per group
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    G = C // CPG
    base = (ng // G) * stride_n + (ng % G) * CPG * stride_c
    shift = tl.load(x_ptr + base).to(tl.float32)
    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    _, m, m2 = _chunk_stats(x_ptr, base, shift, s_begin, s_end, CPG, stride_c, stride_s, BLOCK_C, BLOCK_S)
    out = part_ptr + (ng * SPLITS + split) * 2
    tl.store(out, m)
    tl.store(out + 1, m2)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,   # as in _fused_kernel
    part_ptr,                                         # float32 (N * G, SPLITS, 2) from _stats_kernel
    mean_ptr, rstd_ptr,
    C, S, CPG, stride_n, stride_c, stride_s,
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
    shift = tl.load(x_ptr + base).to(tl.float32)
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
    rstd = 1.0 / tl.sqrt(tl.maximum(g_m2 / total, 0.0, propagate_nan=_NAN) + eps)
    if split == 0:
        tl.store(mean_ptr + ng, g_mean + shift)
        tl.store(rstd_ptr + ng, rstd)
    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG, stride_c, stride_s,
                 s_begin, s_end, shift, g_mean, rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT, SILU, BLOCK_C, BLOCK_S)


@triton.jit
def _rows_stats_kernel(
    x_ptr,                     # channels_last input: (n, c, s) at n * stride_n + s * C + c
    part_ptr,                  # float32 (N, SBLOCKS, C, 2): per (row block, channel) (mean of x - K_c, M2)
    C, S, stride_n, rows,      # rows: spatial positions per program
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    sblock = tl.program_id(1).to(tl.int64)
    nsb = tl.num_programs(1)
    r_begin = sblock * rows
    r_end = tl.minimum(r_begin + rows, S)
    base = x_ptr + n * stride_n
    for cb in range(0, C, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        k = tl.load(base + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # per-channel shift: row 0
        cnt = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for rb in range(r_begin, r_end, BLOCK_R):
            offs_r = rb + tl.arange(0, BLOCK_R)
            mask = (offs_r < r_end)[:, None] & mask_c[None, :]
            v = tl.load(base + offs_r[:, None].to(tl.int64) * C + offs_c[None, :], mask=mask, other=0.0)
            v = v.to(tl.float32) - k[None, :]
            cnt_new = cnt + mask.to(tl.float32)
            delta = v - mean
            mean = mean + tl.where(mask, delta / tl.maximum(cnt_new, 1.0), 0.0)
            m2 = m2 + tl.where(mask, delta * (v - mean), 0.0)
            cnt = cnt_new
        c_cnt = tl.sum(cnt, axis=0)
        c_mean = tl.sum(cnt * mean, axis=0) / tl.maximum(c_cnt, 1.0)
        d = tl.where(cnt > 0, mean - c_mean[None, :], 0.0)
        c_m2 = tl.sum(m2 + cnt * d * d, axis=0)
        out = part_ptr + ((n * nsb + sblock) * C + offs_c) * 2
        tl.store(out, c_mean, mask=mask_c)
        tl.store(out + 1, c_m2, mask=mask_c)


@triton.jit
def _rows_finalize_kernel(
    x_ptr, part_ptr,           # input (for the shifts) and the partials of _rows_stats_kernel
    mean_ptr, rstd_ptr,        # float32 (N * G,) outputs
    shifted_mean_ptr,          # float32 (N * G,): mean - K_g, K_g = x[n, s=0, first channel of g]
    C, S, CPG, stride_n, rows, SBLOCKS, eps,
    SB_P2: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    k_group = tl.load(x_ptr + n * stride_n + c0).to(tl.float32)
    idx = tl.arange(0, SB_P2)
    pmask = idx < SBLOCKS
    p_cnt = tl.where(pmask, tl.minimum(rows, S - idx * rows).to(tl.float32), 0.0)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for c in range(c0, c0 + CPG):
        # the channel's partials are relative to its own shift K_c; move them to the group's shift
        k_c = tl.load(x_ptr + n * stride_n + c).to(tl.float32)
        offs = ((n * SBLOCKS + idx) * C + c) * 2
        p_mean = tl.load(part_ptr + offs, mask=pmask, other=0.0) + (k_c - k_group)
        p_m2 = tl.load(part_ptr + offs + 1, mask=pmask, other=0.0)
        c_cnt = tl.sum(p_cnt)
        c_mean = tl.sum(p_cnt * p_mean) / c_cnt
        d = p_mean - c_mean
        c_m2 = tl.sum(p_m2 + p_cnt * d * d)
        tot = cnt + c_cnt
        delta = c_mean - mean
        mean = mean + delta * (c_cnt / tot)
        m2 = m2 + c_m2 + delta * delta * (cnt * c_cnt / tot)
        cnt = tot
    tl.store(mean_ptr + ng, mean + k_group)
    tl.store(shifted_mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(tl.maximum(m2 / cnt, 0.0, propagate_nan=_NAN) + eps))


@triton.jit
def _rows_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,   # as in _fused_kernel (channels_last x, y)
    shifted_mean_ptr, rstd_ptr,                       # float32 (N * G,) from _rows_finalize_kernel
    C, S, CPG, stride_n, rows,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    sblock = tl.program_id(1).to(tl.int64)
    G = C // CPG
    r_begin = sblock * rows
    r_end = tl.minimum(r_begin + rows, S)
    base = n * stride_n
    for cb in range(0, C, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        grp = n * G + offs_c // CPG
        # x - mean as (x - K_g) - (mean - K_g): exact-ish when |mean| >> std
        k = tl.load(x_ptr + base + (offs_c // CPG) * CPG, mask=mask_c, other=0.0).to(tl.float32)
        m = tl.load(shifted_mean_ptr + grp, mask=mask_c, other=0.0)
        a, b = _channel_coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, offs_c, mask_c,
                                     tl.load(rstd_ptr + grp, mask=mask_c, other=0.0),
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT)
        for rb in range(r_begin, r_end, BLOCK_R):
            offs_r = rb + tl.arange(0, BLOCK_R)
            mask = (offs_r < r_end)[:, None] & mask_c[None, :]
            offs = base + offs_r[:, None].to(tl.int64) * C + offs_c[None, :]
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            v = ((xv - k[None, :]) - m[None, :]) * a[None, :] + b[None, :]
            if SILU:
                v = v * tl.sigmoid(v)
            tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def _rows_config(N, C, S, device, rows=None):
    """(BLOCK_C, BLOCK_R, rows per program, row blocks) for the channels_last plan."""
    block_c = 64 if C % 64 == 0 or C > 64 else triton.next_power_of_2(C)
    if C % 128 == 0:
        block_c = 128
    tile = 4096 if device.type == "cuda" else 1024
    block_r = max(1, min(tile // block_c, triton.next_power_of_2(S)))
    if rows is None:
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            rows = triton.cdiv(S, max(1, min(target // N, 256)))
        else:
            rows = S
    rows = triton.cdiv(max(rows, 1), block_r) * block_r
    return block_c, block_r, rows, triton.cdiv(S, rows)


def _launch_config(N, C, S, G, stride_c, device, splits=None):
    """(BLOCK_C, BLOCK_S, SPLITS, chunk_s, num_warps). Tiles of ~TILE elements: along s when s is the
    contiguous axis (whole channels at a time, no padding for Cg = 10 or 20), along the group's
    channels first when c is (channels_last)."""
    cpg = C // G
    on_gpu = device.type == "cuda"
    tile = 4096 if on_gpu else 1024
    if stride_c == 1 and cpg > 1:
        block_c = min(triton.next_power_of_2(cpg), tile // 16)
        block_s = max(16, min(triton.next_power_of_2(S), tile // block_c))
    else:
        block_s = max(16, min(triton.next_power_of_2(S), tile))
        block_c = max(1, min(triton.next_power_of_2(cpg), tile // block_s))
    if splits is not None:
        splits = max(1, min(splits, triton.cdiv(S, block_s)))
    elif on_gpu:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(triton.cdiv(4 * sms, N * G), triton.cdiv(S, block_s), 64))
    else:
        splits = 1  # the CPU interpreter runs programs one after another: fewest is fastest
    chunk_s = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    splits = triton.cdiv(S, chunk_s)
    num_warps = 8 if block_c * block_s >= 2048 else 4
    return block_c, block_s, splits, chunk_s, num_warps


def group_norm_forward(x3, num_groups, weight, bias, scale, shift, eps, silu, y3, splits=None, plan=None,
                       rows=None):
    """Launch on x3/y3 viewed as (N, C, S) (any strides, shared by both). Returns (mean, rstd), (N, G) fp32.

    plan: "rows" (channels_last only: programs over (sample, rows) x all channels, three launches) or
    "groups" (programs over (group, chunk)); default: "rows" for channels_last with C, S > 1.
    splits / rows force the chunking of either plan (tests use them to reach every path on CPU)."""
    N, C, S = x3.shape
    G = num_groups
    mean = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    sn, sc, ss = x3.stride()
    channels_last = sc == 1 and ss == C and C > 1 and S > 1
    plan = plan or ("rows" if channels_last else "groups")
    if plan == "rows":
        if not channels_last:
            raise ValueError("group_norm: the 'rows' plan needs a channels_last input")
        return _launch_rows(x3, y3, G, weight, bias, scale, shift, eps, silu, mean, rstd, rows)
    block_c, block_s, splits, chunk_s, num_warps = _launch_config(N, C, S, G, sc, x3.device, splits)
    dummy = x3
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              scale if scale is not None else dummy, shift if shift is not None else dummy)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE_SHIFT=scale is not None,
                 SILU=silu, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    if splits == 1:
        _fused_kernel[(N * G,)](x3, y3, *params, mean, rstd, C, S, C // G, sn, sc, ss, eps, **flags)
        return mean, rstd
    part = torch.empty((N * G, splits, 2), device=x3.device, dtype=torch.float32)
    grid = (N * G, splits)
    _stats_kernel[grid](x3, part, C, S, C // G, sn, sc, ss, chunk_s, splits,
                        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
    _apply_kernel[grid](x3, y3, *params, part, mean, rstd, C, S, C // G, sn, sc, ss, chunk_s, splits, eps,
                        SPLITS_P2=triton.next_power_of_2(splits), **flags)
    return mean, rstd


def _launch_rows(x3, y3, G, weight, bias, scale, shift, eps, silu, mean, rstd, rows):
    N, C, S = x3.shape
    sn = x3.stride(0)
    block_c, block_r, rows, sblocks = _rows_config(N, C, S, x3.device, rows)
    num_warps = 8 if block_c * block_r >= 2048 else 4
    part = torch.empty((N, sblocks, C, 2), device=x3.device, dtype=torch.float32)
    _rows_stats_kernel[(N, sblocks)](x3, part, C, S, sn, rows, BLOCK_C=block_c, BLOCK_R=block_r,
                                     num_warps=num_warps)
    shifted_mean = torch.empty_like(mean)
    _rows_finalize_kernel[(N * G,)](x3, part, mean, rstd, shifted_mean, C, S, C // G, sn, rows, sblocks, eps,
                                    SB_P2=triton.next_power_of_2(sblocks), num_warps=1)
    dummy = x3
    _rows_apply_kernel[(N, sblocks)](
        x3, y3, weight if weight is not None else dummy, bias if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, shifted_mean, rstd,
        C, S, C // G, sn, rows,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE_SHIFT=scale is not None,
        SILU=silu, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps)
    return mean, rstd
