"""Triton GroupNorm (+ scale-shift) (+ SiLU / GELU) forward, laid out for the memory-bandwidth limit.

Element (n, c, s) is at n * stride_n + c * stride_c + s * stride_s, so contiguous and channels_last
inputs share the code. The launch plan is a plain function of the shape, dtype, layout and SM count,
`launch_config(N, C, S, G, elem_bytes, channels_last, num_sms)`, so that scripts (the static compile
check of benchmarks/gpu_static.py) build exactly the kernels a call would run.

Plans (what the fastest public GroupNorm kernels do; no grid-wide synchronisation anywhere):
- "resident": one program per (sample, group) holding the whole group in registers: x is read from
  memory once and y written once, the bandwidth floor. Taken when the group's tile fits
  (<= RESIDENT_MAX elements) and there are enough groups to fill the GPU (N * G >= the SM count).
- "split": few groups (batch 1 or 2) or groups too large for registers, when the tensor fits in L2:
  grid (N * G, SPLITS) with enough programs for every SM; `_partial_kernel` writes each chunk's
  (mean, M2), `_apply_kernel` merges the group's partials (a few floats, Chan's formula) and applies
  to its chunk, whose second read comes from L2.
- "looped": groups too large for registers at a large batch (a tensor larger than L2, and at least
  one group per SM), either layout: one program per group reads it tile by tile for the statistics,
  then again to apply, while the group (<= a few hundred KB per program) is still in L2.
- "rows" (channels_last with C, S > 1, few groups, no resident tile): grid (sample, block of spatial
  rows, block of channels), coalesced along C: per-channel partials, a tiny per-group merge, then the
  apply over the same rows (its second read from L2: the tensor is small when this plan is chosen).

Statistics: x - K with K the group's first element (|mean| >> std costs no precision), then per
register tile an exact two-pass (tile mean, then the sum of squared deviations from it), tiles merged
with Chan's formula: no per-element division (a per-element Welford update divides once per element,
which is the ALU cost that kept the previous kernel off the bandwidth limit).
Apply: y = act(((x - K) - (mean - K)) * A[c] + B[c]), A and B folding rstd, affine and scale-shift.

NaN / Inf: a NaN or +-inf anywhere in a group makes its mean or M2 NaN; tl.maximum(..., propagate_nan)
keeps it (tl.maximum's default would drop it), so the whole group comes out NaN.
"""

import torch
import triton
import triton.language as tl

# Largest register tile (elements) of a resident group, of a split chunk, of a looped tile. ptxas caps a
# 16-warp program at 128 registers a thread: 16384 elements is 32 a thread (fp32 value + int32 offset).
RESIDENT_MAX = 16384
SPLIT_TILE = 8192
LOOP_TILE = 4096
L2_REUSE_BYTES = 24 << 20  # half of an H100's 50 MB L2: a second read of a tensor this size mostly hits
H100_SMS = 132


@triton.jit
def _act(v, ACT: tl.constexpr):
    """ACT 0: none, 1: SiLU, 2: GELU (erf), 3: GELU, tanh form, as v * sigmoid(2u) = 0.5 v (1 + tanh(u)),
    u = sqrt(2 / pi) (v + 0.044715 v^3) (the codes of diffkern.ops._group_norm_kernels.ACTIVATION_CODES)."""
    if ACT == 1:
        v = v * tl.sigmoid(v)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 3:
        v = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    return v


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's formula: the (count, mean, M2) of two disjoint sets (n_b > 0)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    r = n_b / n
    return n, mean_a + delta * r, m2_a + m2_b + delta * delta * (n_a * r)


@triton.jit
def _tile_load(x_ptr, base, c_begin, c_end, s_begin, s_end, stride_c, stride_s, K,
               BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(x - K as float32 (0 where masked), mask, offsets from base, count) of the tile [c_begin, +BLOCK_C) x
    [s_begin, +BLOCK_S). The offsets are int32 (one sample has < 2^31 elements; the launcher checks):
    half the registers of int64 ones, which a whole-group tile holds from its load to its store."""
    offs_c = c_begin + tl.arange(0, BLOCK_C)
    offs_s = s_begin + tl.arange(0, BLOCK_S)
    mask = (offs_c < c_end)[:, None] & (offs_s < s_end)[None, :]
    offs = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
    v = tl.where(mask, tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - K, 0.0)
    cnt = ((tl.minimum(c_end, c_begin + BLOCK_C) - c_begin) * (tl.minimum(s_end, s_begin + BLOCK_S) - s_begin))
    return v, mask, offs, cnt.to(tl.float32)


@triton.jit
def _tile_moments(v, mask, cnt):
    """Exact two-pass (mean, M2) of a register tile (masked entries of v are 0)."""
    mean = tl.sum(tl.sum(v, axis=1), axis=0) / cnt
    d = tl.where(mask, v - mean, 0.0)
    return mean, tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def _chunk_stats(x_ptr, base, K, s_begin, s_end, CPG, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of x - K over the group's channels and spatial range [s_begin, s_end)."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for cb in range(0, CPG, BLOCK_C):
        for sb in range(s_begin, s_end, BLOCK_S):
            v, mask, _, cnt = _tile_load(x_ptr, base, cb, CPG, sb, s_end, stride_c, stride_s, K, BLOCK_C, BLOCK_S)
            t_mean, t_m2 = _tile_moments(v, mask, cnt)
            n, mean, m2 = _merge(n, mean, m2, cnt, t_mean, t_m2)
    return n, mean, m2


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
def _rstd(m2, cnt, eps):
    return 1.0 / tl.sqrt(tl.maximum(m2 / cnt, 0.0, propagate_nan=tl.PropagateNan.ALL) + eps)


@triton.jit
def _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG,
                 stride_c, stride_s, s_begin, s_end, K, m, rstd,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    for cb in range(0, CPG, BLOCK_C):
        offs_c = cb + tl.arange(0, BLOCK_C)
        a, b = _channel_coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c0 + offs_c, offs_c < CPG,
                                     tl.full([BLOCK_C], 1.0, tl.float32) * rstd,
                                     HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT)
        for sb in range(s_begin, s_end, BLOCK_S):
            v, mask, offs, _ = _tile_load(x_ptr, base, cb, CPG, sb, s_end, stride_c, stride_s, K, BLOCK_C, BLOCK_S)
            out = _act((v - m) * a[:, None] + b[:, None], ACT)
            tl.store(y_ptr + base + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resident_kernel(
    x_ptr, y_ptr,              # input and output, same strides
    w_ptr, b_ptr,              # (C,), or dummies when HAS_WEIGHT / HAS_BIAS are False
    scale_ptr, shift_ptr,      # (N, C) contiguous, or dummies when HAS_SCALE_SHIFT is False
    mean_ptr, rstd_ptr,        # float32 (N * G,) outputs
    C, S, CPG,                 # channels, flattened spatial size, channels per group
    stride_n, stride_c, stride_s, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g); the whole group is one register tile (BLOCK_C >= CPG, BLOCK_S >= S)."""
    ng = tl.program_id(0).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = n * stride_n + c0 * stride_c
    K = tl.load(x_ptr + base).to(tl.float32)
    v, mask, offs, cnt = _tile_load(x_ptr, base, 0, CPG, 0, S, stride_c, stride_s, K, BLOCK_C, BLOCK_S)
    m, m2 = _tile_moments(v, mask, cnt)
    rstd = _rstd(m2, cnt, eps)
    tl.store(mean_ptr + ng, m + K)
    tl.store(rstd_ptr + ng, rstd)
    offs_c = tl.arange(0, BLOCK_C)
    a, b = _channel_coefficients(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, c0 + offs_c, offs_c < CPG,
                                 tl.full([BLOCK_C], 1.0, tl.float32) * rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT)
    out = _act((v - m) * a[:, None] + b[:, None], ACT)
    tl.store(y_ptr + base + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _looped_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,   # as in _resident_kernel
    C, S, CPG, stride_n, stride_c, stride_s, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (n, g): statistics tile by tile, then the apply re-reads the group (from L2)."""
    ng = tl.program_id(0).to(tl.int64)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = n * stride_n + c0 * stride_c
    K = tl.load(x_ptr + base).to(tl.float32)
    total, m, m2 = _chunk_stats(x_ptr, base, K, 0, S, CPG, stride_c, stride_s, BLOCK_C, BLOCK_S)
    rstd = _rstd(m2, total, eps)
    tl.store(mean_ptr + ng, m + K)
    tl.store(rstd_ptr + ng, rstd)
    _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG, stride_c, stride_s,
                 0, S, K, m, rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT, ACT, BLOCK_C, BLOCK_S)


@triton.jit
def _partial_kernel(
    x_ptr,                     # input
    part_ptr,                  # float32 (N * G, SPLITS, 2): per chunk (mean of x - K, M2)
    C, S, CPG, stride_n, stride_c, stride_s,
    chunk_s, SPLITS,           # spatial positions per chunk, chunks per group
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    G = C // CPG
    base = (ng // G) * stride_n + (ng % G) * CPG * stride_c
    K = tl.load(x_ptr + base).to(tl.float32)
    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    _, m, m2 = _chunk_stats(x_ptr, base, K, s_begin, s_end, CPG, stride_c, stride_s, BLOCK_C, BLOCK_S)
    out = part_ptr + (ng * SPLITS + split) * 2
    tl.store(out, m)
    tl.store(out + 1, m2)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,   # as in _resident_kernel
    part_ptr,                                         # float32 (N * G, SPLITS, 2) from _partial_kernel
    mean_ptr, rstd_ptr,
    C, S, CPG, stride_n, stride_c, stride_s,
    chunk_s, SPLITS, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    ACT: tl.constexpr, SPLITS_P2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ng = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    G = C // CPG
    n = ng // G
    c0 = (ng % G) * CPG
    base = n * stride_n + c0 * stride_c
    K = tl.load(x_ptr + base).to(tl.float32)
    # merge the group's partials; chunk i holds min(chunk_s, S - i * chunk_s) * CPG elements
    idx = tl.arange(0, SPLITS_P2)
    pmask = idx < SPLITS
    p_cnt = tl.where(pmask, tl.minimum(chunk_s, S - idx * chunk_s).to(tl.float32) * CPG, 0.0)
    p_mean = tl.load(part_ptr + (ng * SPLITS + idx) * 2, mask=pmask, other=0.0)
    p_m2 = tl.load(part_ptr + (ng * SPLITS + idx) * 2 + 1, mask=pmask, other=0.0)
    total = tl.sum(p_cnt)
    g_mean = tl.sum(p_cnt * p_mean) / total
    dev = tl.where(pmask, p_mean - g_mean, 0.0)
    g_m2 = tl.sum(p_m2 + p_cnt * dev * dev)
    rstd = _rstd(g_m2, total, eps)
    if split == 0:
        tl.store(mean_ptr + ng, g_mean + K)
        tl.store(rstd_ptr + ng, rstd)
    s_begin = split * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    _chunk_apply(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, base, n, c0, C, CPG, stride_c, stride_s,
                 s_begin, s_end, K, g_mean, rstd, HAS_WEIGHT, HAS_BIAS, HAS_SCALE_SHIFT, ACT, BLOCK_C, BLOCK_S)


@triton.jit
def _rows_stats_kernel(
    x_ptr,                     # channels_last input: (n, c, s) at n * stride_n + s * C + c
    part_ptr,                  # float32 (N, SBLOCKS, C, 2): per (row block, channel) (mean of x - K_c, M2)
    C, S, stride_n, rows,      # rows: spatial positions per program
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grid (N, SBLOCKS, C / BLOCK_C): per-channel partials of one block of rows."""
    n = tl.program_id(0).to(tl.int64)
    sblock = tl.program_id(1)
    nsb = tl.num_programs(1)
    r_begin = sblock * rows
    r_end = tl.minimum(r_begin + rows, S)
    base = x_ptr + n * stride_n
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    k = tl.load(base + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # per-channel shift: row 0
    cnt = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for rb in range(r_begin, r_end, BLOCK_R):
        offs_r = rb + tl.arange(0, BLOCK_R)
        mask = (offs_r < r_end)[:, None] & mask_c[None, :]
        v = tl.load(base + offs_r[:, None] * C + offs_c[None, :], mask=mask, other=0.0)  # int32 within a sample
        v = tl.where(mask, v.to(tl.float32) - k[None, :], 0.0)
        t_cnt = (tl.minimum(r_end, rb + BLOCK_R) - rb).to(tl.float32)
        t_mean = tl.sum(v, axis=0) / t_cnt
        d = tl.where(mask, v - t_mean[None, :], 0.0)
        cnt, mean, m2 = _merge(cnt, mean, m2, t_cnt, t_mean, tl.sum(d * d, axis=0))
    out = part_ptr + ((n * nsb + sblock) * C + offs_c) * 2
    tl.store(out, mean, mask=mask_c)
    tl.store(out + 1, m2, mask=mask_c)


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
        d = tl.where(pmask, p_mean - c_mean, 0.0)
        cnt, mean, m2 = _merge(cnt, mean, m2, c_cnt, c_mean, tl.sum(p_m2 + p_cnt * d * d))
    tl.store(mean_ptr + ng, mean + k_group)
    tl.store(shifted_mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, _rstd(m2, cnt, eps))


@triton.jit
def _rows_apply_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,   # as in _resident_kernel (channels_last x, y)
    shifted_mean_ptr, rstd_ptr,                       # float32 (N * G,) from _rows_finalize_kernel
    C, S, CPG, stride_n, rows,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """grid (N, SBLOCKS, C / BLOCK_C), as _rows_stats_kernel."""
    n = tl.program_id(0).to(tl.int64)
    sblock = tl.program_id(1)
    G = C // CPG
    r_begin = sblock * rows
    r_end = tl.minimum(r_begin + rows, S)
    base = n * stride_n
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
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
        offs = offs_r[:, None] * C + offs_c[None, :]  # int32 within a sample
        xv = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = _act(((xv - k[None, :]) - m[None, :]) * a[None, :] + b[None, :], ACT)
        tl.store(y_ptr + base + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch configuration: a plain function of the problem, for the launcher and for static checks


def _p2(v):
    return triton.next_power_of_2(max(int(v), 1))


def _warps(tile):
    """At most 16 elements a thread below the resident maximum (32 there)."""
    return 16 if tile > 4096 else 8 if tile >= 2048 else 4


def _group_tile(cpg, S, channels_last, limit):
    """(BLOCK_C, BLOCK_S) of a tile of at most `limit` elements over a group's channels and positions:
    along s when s is the contiguous axis (whole channels at a time), along c first when c is."""
    if channels_last and cpg > 1:
        block_c = min(_p2(cpg), limit // 16)
        block_s = max(1, min(_p2(S), limit // block_c))
    else:
        block_s = min(_p2(S), limit)
        block_c = max(1, min(_p2(cpg), limit // block_s))
    return block_c, block_s


def launch_config(N, C, S, G, elem_bytes, channels_last, num_sms=None, *, plan=None, splits=None, rows=None,
                  tile=None):
    """The launch of group_norm_forward for x viewed as (N, C, S) with G groups, as a dict:

        plan        "resident", "split", "looped" or "rows" (see the module docstring)
        kernels     the kernels launched, in order
        block_c, block_s (groups plans) / block_c, block_r, rows, sblocks (rows plan), splits, chunk_s,
        num_warps, grid (of the main kernel), and for the static checks the compile-time flags.

    elem_bytes: 4, 2 (x's element size); channels_last: stride_c == 1 (and C, S > 1); num_sms: the
    GPU's SM count, or None for the CPU interpreter (which runs programs one after another, so the
    fewest programs are fastest). plan / splits / rows / tile (the register tile's element budget)
    force a plan and its chunking (tests reach every path on the CPU with them)."""
    cpg = C // G
    on_gpu = num_sms is not None
    full_c, full_s = _p2(cpg), _p2(S)
    fits = full_c * full_s <= RESIDENT_MAX
    cl = channels_last and C > 1 and S > 1
    if plan is None:
        if on_gpu:
            big = N * C * S * elem_bytes > L2_REUSE_BYTES and N * G >= num_sms
            if fits and N * G >= num_sms:
                plan = "resident"
            elif big:
                plan = "looped"  # a second pass over the whole tensor would miss L2: re-read per group
            else:
                plan = "rows" if cl else "split"
        else:
            plan = "resident" if fits and splits is None else "rows" if cl and splits is None else (
                "split" if splits is not None and splits > 1 else "looped")
    if plan == "rows":
        if not cl:
            raise ValueError("group_norm: the 'rows' plan needs a channels_last input with C, S > 1")
        block_c = 128 if C % 128 == 0 else 64 if (C % 64 == 0 or C > 64) else _p2(C)
        block_r = max(1, min((tile or (LOOP_TILE if on_gpu else 1024)) // block_c, _p2(S)))
        cblocks = triton.cdiv(C, block_c)
        if rows is None:  # ~4 programs per SM over (sample, row block, channel block)
            rows = triton.cdiv(S, max(1, min(triton.cdiv(4 * num_sms, N * cblocks), 256))) if on_gpu else S
        rows = triton.cdiv(max(rows, 1), block_r) * block_r
        sblocks = triton.cdiv(S, rows)
        return dict(plan="rows", kernels=("_rows_stats_kernel", "_rows_finalize_kernel", "_rows_apply_kernel"),
                    block_c=block_c, block_r=block_r, rows=rows, sblocks=sblocks, grid=(N, sblocks, cblocks),
                    num_warps=_warps(block_c * block_r), splits=1, chunk_s=S)
    if plan == "resident":
        if not fits:
            raise ValueError(f"group_norm: a group of {cpg} x {S} does not fit a resident tile "
                             f"({full_c} x {full_s} > {RESIDENT_MAX})")
        return dict(plan="resident", kernels=("_resident_kernel",), block_c=full_c, block_s=full_s,
                    splits=1, chunk_s=S, grid=(N * G,), num_warps=_warps(full_c * full_s))
    if plan == "looped":
        block_c, block_s = _group_tile(cpg, S, channels_last, tile or (LOOP_TILE if on_gpu else 1024))
        return dict(plan="looped", kernels=("_looped_kernel",), block_c=block_c, block_s=block_s, splits=1,
                    chunk_s=S, grid=(N * G,), num_warps=_warps(block_c * block_s))
    if plan != "split":
        raise ValueError(f"group_norm: unknown plan {plan!r}")
    # split: every chunk one register tile where possible, enough programs for every SM
    block_c, block_s = _group_tile(cpg, S, channels_last, tile or (SPLIT_TILE if on_gpu else 1024))
    if splits is None:
        want = triton.cdiv(2 * num_sms, N * G) if on_gpu else 1
        splits = max(want, triton.cdiv(full_c * full_s, block_c * block_s))
    splits = max(1, min(int(splits), S, 64))
    chunk_s = triton.cdiv(S, splits)
    if chunk_s < block_s:  # a smaller tile that the chunk fills
        block_s = max(1, min(block_s, _p2(chunk_s)))
    chunk_s = triton.cdiv(chunk_s, block_s) * block_s
    splits = triton.cdiv(S, chunk_s)
    return dict(plan="split", kernels=("_partial_kernel", "_apply_kernel"), block_c=block_c, block_s=block_s,
                splits=splits, chunk_s=chunk_s, grid=(N * G, splits), num_warps=_warps(block_c * block_s))


def group_norm_forward(x3, num_groups, weight, bias, scale, shift, eps, act, y3, splits=None, plan=None,
                       rows=None, tile=None):
    """Launch on x3/y3 viewed as (N, C, S) (any strides, shared by both). Returns (mean, rstd), (N, G) fp32.

    act: activation code, 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh); a bool is the old silu flag.
    plan / splits / rows / tile: force a plan of `launch_config` and its chunking (tests)."""
    N, C, S = x3.shape
    G = num_groups
    act = int(act)
    if C * S >= 2 ** 31:
        raise ValueError(f"group_norm (triton): one sample of {C * S} elements; the kernels index within a "
                         "sample in int32 (< 2^31 elements)")
    mean = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x3.device, dtype=torch.float32)
    sn, sc, ss = x3.stride()
    channels_last = sc == 1 and ss == C and C > 1 and S > 1
    num_sms = (torch.cuda.get_device_properties(x3.device).multi_processor_count
               if x3.device.type == "cuda" else None)
    cfg = launch_config(N, C, S, G, x3.element_size(), channels_last, num_sms, plan=plan, splits=splits,
                        rows=rows, tile=tile)
    dummy = x3
    params = (weight if weight is not None else dummy, bias if bias is not None else dummy,
              scale if scale is not None else dummy, shift if shift is not None else dummy)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE_SHIFT=scale is not None,
                 ACT=act, num_warps=cfg["num_warps"])
    cpg = C // G
    if cfg["plan"] == "rows":
        bc, br, nrows, sblocks = cfg["block_c"], cfg["block_r"], cfg["rows"], cfg["sblocks"]
        part = torch.empty((N, sblocks, C, 2), device=x3.device, dtype=torch.float32)
        _rows_stats_kernel[cfg["grid"]](x3, part, C, S, sn, nrows, BLOCK_C=bc, BLOCK_R=br,
                                        num_warps=cfg["num_warps"])
        shifted_mean = torch.empty_like(mean)
        _rows_finalize_kernel[(N * G,)](x3, part, mean, rstd, shifted_mean, C, S, cpg, sn, nrows, sblocks, eps,
                                        SB_P2=_p2(sblocks), num_warps=1)
        _rows_apply_kernel[cfg["grid"]](x3, y3, *params, shifted_mean, rstd, C, S, cpg, sn, nrows,
                                        BLOCK_C=bc, BLOCK_R=br, **flags)
        return mean, rstd
    tiles = dict(BLOCK_C=cfg["block_c"], BLOCK_S=cfg["block_s"])
    if cfg["plan"] == "resident":
        _resident_kernel[(N * G,)](x3, y3, *params, mean, rstd, C, S, cpg, sn, sc, ss, eps, **tiles, **flags)
    elif cfg["plan"] == "looped":
        _looped_kernel[(N * G,)](x3, y3, *params, mean, rstd, C, S, cpg, sn, sc, ss, eps, **tiles, **flags)
    else:
        nsplit, chunk_s = cfg["splits"], cfg["chunk_s"]
        part = torch.empty((N * G, nsplit, 2), device=x3.device, dtype=torch.float32)
        grid = (N * G, nsplit)
        _partial_kernel[grid](x3, part, C, S, cpg, sn, sc, ss, chunk_s, nsplit, **tiles,
                              num_warps=cfg["num_warps"])
        _apply_kernel[grid](x3, y3, *params, part, mean, rstd, C, S, cpg, sn, sc, ss, chunk_s, nsplit, eps,
                            SPLITS_P2=_p2(nsplit), **tiles, **flags)
    return mean, rstd
