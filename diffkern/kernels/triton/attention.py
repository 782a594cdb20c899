"""Triton FlashAttention forward and backward, with prefix keys, an additive bias and causal masking.

Keys come in two segments: the optional prefix kp/vp (Sp keys, always visible, bias columns [0, Sp))
then the main k/v (Sk keys, bias columns [Sp, Sp + Sk), causal when asked: query i sees key j <= i,
top-left aligned as torch SDPA). Every operand is read in place through its strides (views of a fused
qkv tensor, biases .expand()ed with 0 strides); no Sq x Sk tensor is ever materialised.

Forward: grid (cdiv(Sq, BLOCK_M), B * H). A program holds a block of queries and streams key blocks
(the prefix, then the main keys up to the diagonal) through the online softmax in base 2: scores are
scaled by scale * log2(e) and the bias by log2(e), so exp2 replaces exp; lse is stored in natural log.
Rows whose keys are all masked keep m = -inf, l = 0: they output 0 and lse = -inf. A -inf bias entry masks
its key even where the score is NaN; NaN scores elsewhere make l NaN, so NaN reaches out and lse.

Backward (FlashAttention-2, no atomics, deterministic):
- _bwd_preprocess_kernel: delta = rowsum(dO * O), fp32 (B * H, Sq), the only extra memory;
- _bwd_dkdv_kernel, grid (cdiv(Sp, BLOCK_N) + cdiv(Sk, BLOCK_N), B * H): a program holds one key
  block (prefix or main) and streams query blocks (from the diagonal on, for causal main keys),
  recomputing P = exp2(s - lse), dV += P^T dO, dK += dS^T Q * scale with dS = P * (dP - delta);
- _bwd_dq_kernel, grid (cdiv(Sq, BLOCK_M), B * H): streams key blocks as the forward does,
  dQ += dS K * scale, and writes dS to dbias when asked (each element by exactly one program).

Precision: fp32 accumulation and softmax statistics; tl.dot operands in the input dtype (P and dS are
rounded to it before their products, as FlashAttention does). fp32 inputs use
tl.dot(..., input_precision="ieee"), so GPUs do not round them to TF32 and results match fp32 math.
In Triton's CPU interpreter (tests) bf16 takes DOT_MODE 2: its tl.dot multiplies bf16's raw bits and its
fp32 -> bf16 cast truncates, so operands are upcast for tl.dot and downcasts are rounded by hand.

Launch plan: BLOCK_D = max(16, next_power_of_2(D)), loads and stores masked along d. On CUDA the forward
takes BLOCK_M x BLOCK_N = 128 x 64 (D <= 64), 64 x 64 (D <= 128) or 64 x 32 (D > 128, or fp32 with
D > 64), 4-8 warps, 2-3 stages; the backward 64 x 64 (32 x 32 likewise). The interpreter takes 16 x 16.
"""

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    """a @ b accumulated in fp32. DOT_MODE 0: native; 1: fp32 inputs without TF32 rounding; 2: operands
    upcast to fp32 first (bf16 in the CPU interpreter, whose tl.dot multiplies bf16's raw bits; products
    of bf16 values are exact in fp32, so this is the GPU's bf16 tl.dot)."""
    if DOT_MODE == 1:
        c = tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 2:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _to(x, dtype: tl.constexpr, DOT_MODE: tl.constexpr):
    """x.to(dtype), rounding to nearest even: by hand in mode 2 (the interpreter truncates fp32 -> bf16)."""
    if DOT_MODE == 2:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_tile(base, offs_r, offs_d, stride_r, stride_d, n_rows, D):
    """(len(offs_r), BLOCK_D) tile of a (rows, D) matrix, zeros outside."""
    mask = (offs_r < n_rows)[:, None] & (offs_d < D)[None, :]
    return tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _scores(q, k, bias_base, offs_m, offs_n, col0, Sq, n_keys, stride_bm, stride_bn, qk_scale,
            CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr):
    """Base-2 scores (q k^T * scale + bias) * log2(e) of a (BLOCK_M, BLOCK_N) tile, -inf where hidden."""
    s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale
    visible = (offs_n < n_keys)[None, :]
    if HAS_BIAS:
        bmask = (offs_m < Sq)[:, None] & visible
        b = tl.load(bias_base + offs_m[:, None] * stride_bm + (col0 + offs_n)[None, :] * stride_bn,
                    mask=bmask, other=0.0)
        s += b.to(tl.float32) * LOG2E
        visible = visible & (b != float("-inf"))  # a -inf entry masks its key even where q k^T is NaN
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, k_base, v_base, bias_base, offs_m, offs_d, col0, n_keys, n_end, Sq, D,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, qk_scale,
                 CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over keys [0, n_end) of one segment (n_keys keys, bias columns from col0)."""
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, n_keys, D)
        s = _scores(q, k, bias_base, offs_m, offs_n, col0, Sq, n_keys, stride_bm, stride_bn, qk_scale,
                    CAUSAL, HAS_BIAS, DOT_MODE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all hidden so far: exp2(-inf - 0) = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, n_keys, D)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype, DOT_MODE), v, DOT_MODE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr,          # (B, H, Sq|Sk, D), any strides
    kp_ptr, vp_ptr,               # (B, H, Sp, D) prefix, or dummies when HAS_PREFIX is False
    bias_ptr,                     # (B, H, Sq, Sp + Sk), any strides (0 for broadcast), or a dummy
    out_ptr, lse_ptr,             # outputs: (B, H, Sq, D) strided, float32 (B * H, Sq) contiguous
    H, Sq, Sk, Sp, D, qk_scale,   # qk_scale = scale * log2(e)
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,   # element strides (batch, head,
    skp_b, skp_h, skp_n, skp_d, svp_b, svp_h, svp_n, svp_d,                 # row, column) of each tensor,
    sb_b, sb_h, sb_m, sb_n, so_b, so_h, so_m, so_d,                         # 0 for absent ones
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_m, sq_d, Sq, D)
    bias_base = bias_ptr + b * sb_b + h * sb_h
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_PREFIX:
        acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, kp_ptr + b * skp_b + h * skp_h,
                                     vp_ptr + b * svp_b + h * svp_h, bias_base, offs_m, offs_d, 0, Sp, Sp,
                                     Sq, D, skp_n, skp_d, svp_n, svp_d, sb_m, sb_n, qk_scale,
                                     False, HAS_BIAS, DOT_MODE, BLOCK_N)
    n_end = Sk
    if CAUSAL:
        n_end = tl.minimum(Sk, start_m + BLOCK_M)  # blocks wholly above the diagonal are skipped
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h,
                                 bias_base, offs_m, offs_d, Sp, Sk, n_end, Sq, D,
                                 sk_n, sk_d, sv_n, sv_d, sb_m, sb_n, qk_scale,
                                 CAUSAL, HAS_BIAS, DOT_MODE, BLOCK_N)
    # l = 0 exactly when every key of the row is masked: out = 0 there even if acc caught 0 * NaN from a
    # masked value; a NaN l (NaN scores) is not "dead" and keeps NaN in out and lse
    dead = l_i == 0.0
    out = tl.where(dead[:, None], 0.0, acc / tl.where(dead, 1.0, l_i)[:, None])
    mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    tl.store(out_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
             _to(out, out_ptr.dtype.element_ty, DOT_MODE), mask=mask)
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * LN2)
    tl.store(lse_ptr + bh * Sq + offs_m, lse, mask=offs_m < Sq)


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr, do_ptr,              # (B, H, Sq, D), any strides
    delta_ptr,                    # float32 (B * H, Sq) output: rowsum(dO * O)
    H, Sq, D,
    so_b, so_h, so_m, so_d, sdo_b, sdo_h, sdo_m, sdo_d,   # strides (batch, head, row, d)
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    o = _load_tile(out_ptr + b * so_b + h * so_h, offs_m, offs_d, so_m, so_d, Sq, D).to(tl.float32)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, offs_m, offs_d, sdo_m, sdo_d, Sq, D).to(tl.float32)
    tl.store(delta_ptr + bh * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, bh, offs_m, Sq):
    """Base-2 lse (+inf for fully masked and padding rows, so that P = 0 there) and delta."""
    mask = offs_m < Sq
    lse = tl.load(lse_ptr + bh * Sq + offs_m, mask=mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(delta_ptr + bh * Sq + offs_m, mask=mask, other=0.0)


@triton.jit
def _bwd_dkdv_block(q_base, do_base, lse_ptr, delta_ptr, bh, k_base, v_base, dk_base, dv_base, bias_base,
                    start_n, col0, n_keys, Sq, D, scale, qk_scale,
                    sq_m, sq_d, sdo_m, sdo_d, sk_n, sk_d, sv_n, sv_d, sdk_n, sdk_d, sdv_n, sdv_d, sb_m, sb_n,
                    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK, dV of keys [start_n, start_n + BLOCK_N) of one segment, over every query that sees them."""
    offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    k = _load_tile(k_base, offs_n, offs_d, sk_n, sk_d, n_keys, D)
    v = _load_tile(v_base, offs_n, offs_d, sv_n, sv_d, n_keys, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_begin = 0
    if CAUSAL:
        m_begin = (start_n // BLOCK_M) * BLOCK_M  # earlier queries do not see these keys
    for start_m in range(m_begin, Sq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        q = _load_tile(q_base, offs_m, offs_d, sq_m, sq_d, Sq, D)
        do = _load_tile(do_base, offs_m, offs_d, sdo_m, sdo_d, Sq, D)
        lse2, delta = _load_row_stats(lse_ptr, delta_ptr, bh, offs_m, Sq)
        s = _scores(q, k, bias_base, offs_m, offs_n, col0, Sq, n_keys, sb_m, sb_n, qk_scale,
                    CAUSAL, HAS_BIAS, DOT_MODE)
        p = tl.math.exp2(s - lse2[:, None])
        pt = tl.trans(_to(p, do.dtype, DOT_MODE))
        dv += _dot(pt, do, DOT_MODE)
        dp = _dot(do, tl.trans(v), DOT_MODE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(_to(ds, q.dtype, DOT_MODE)), q, DOT_MODE)
    mask = (offs_n < n_keys)[:, None] & (offs_d < D)[None, :]
    tl.store(dk_base + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             _to(dk * scale, dk_base.dtype.element_ty, DOT_MODE), mask=mask)
    tl.store(dv_base + offs_n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
             _to(dv, dv_base.dtype.element_ty, DOT_MODE), mask=mask)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, bias_ptr,   # as in _fwd_kernel
    do_ptr,                       # (B, H, Sq, D), any strides
    lse_ptr, delta_ptr,           # float32 (B * H, Sq) contiguous
    dk_ptr, dv_ptr,               # outputs (B, H, Sk, D) strided
    dkp_ptr, dvp_ptr,             # outputs (B, H, Sp, D) strided, or dummies
    H, Sq, Sk, Sp, D, scale, qk_scale,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    skp_b, skp_h, skp_n, skp_d, svp_b, svp_h, svp_n, svp_d,
    sb_b, sb_h, sb_m, sb_n, sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    sdkp_b, sdkp_h, sdkp_n, sdkp_d, sdvp_b, sdvp_h, sdvp_n, sdvp_d,        # strides as in _fwd_kernel
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)   # prefix key blocks first, then main key blocks
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    bias_base = bias_ptr + b * sb_b + h * sb_h
    n_prefix_blocks = 0
    if HAS_PREFIX:
        n_prefix_blocks = tl.cdiv(Sp, BLOCK_N)
    if blk < n_prefix_blocks:
        _bwd_dkdv_block(q_base, do_base, lse_ptr, delta_ptr, bh, kp_ptr + b * skp_b + h * skp_h,
                        vp_ptr + b * svp_b + h * svp_h, dkp_ptr + b * sdkp_b + h * sdkp_h,
                        dvp_ptr + b * sdvp_b + h * sdvp_h, bias_base, blk * BLOCK_N, 0, Sp, Sq, D, scale,
                        qk_scale, sq_m, sq_d, sdo_m, sdo_d, skp_n, skp_d, svp_n, svp_d,
                        sdkp_n, sdkp_d, sdvp_n, sdvp_d, sb_m, sb_n,
                        False, HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        _bwd_dkdv_block(q_base, do_base, lse_ptr, delta_ptr, bh, k_ptr + b * sk_b + h * sk_h,
                        v_ptr + b * sv_b + h * sv_h, dk_ptr + b * sdk_b + h * sdk_h,
                        dv_ptr + b * sdv_b + h * sdv_h, bias_base, (blk - n_prefix_blocks) * BLOCK_N, Sp, Sk,
                        Sq, D, scale, qk_scale, sq_m, sq_d, sdo_m, sdo_d, sk_n, sk_d, sv_n, sv_d,
                        sdk_n, sdk_d, sdv_n, sdv_d, sb_m, sb_n,
                        CAUSAL, HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _bwd_dq_segment(dq, q, do, lse2, delta, k_base, v_base, bias_base, dbias_base, offs_m, offs_d,
                    col0, n_keys, n_end, Sq, D, qk_scale, sk_n, sk_d, sv_n, sv_d, sb_m, sb_n, sdb_m,
                    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_DBIAS: tl.constexpr,
                    DOT_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (unscaled) over keys [0, n_end) of one segment; dS into dbias columns col0 + n."""
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        k = _load_tile(k_base, offs_n, offs_d, sk_n, sk_d, n_keys, D)
        v = _load_tile(v_base, offs_n, offs_d, sv_n, sv_d, n_keys, D)
        s = _scores(q, k, bias_base, offs_m, offs_n, col0, Sq, n_keys, sb_m, sb_n, qk_scale,
                    CAUSAL, HAS_BIAS, DOT_MODE)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), DOT_MODE)
        ds = p * (dp - delta[:, None])
        dq += _dot(_to(ds, k.dtype, DOT_MODE), k, DOT_MODE)
        if WRITE_DBIAS:
            mask = (offs_m < Sq)[:, None] & (offs_n < n_keys)[None, :]
            tl.store(dbias_base + offs_m[:, None] * sdb_m + (col0 + offs_n)[None, :], ds, mask=mask)
    return dq


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _bwd_dkdv_kernel
    dq_ptr,                       # output (B, H, Sq, D) strided
    dbias_ptr,                    # float32 (B, H, Sq, Sp + Sk) zero-filled output, or a dummy
    H, Sq, Sk, Sp, D, scale, qk_scale,
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    skp_b, skp_h, skp_n, skp_d, svp_b, svp_h, svp_n, svp_d,
    sb_b, sb_h, sb_m, sb_n, sdo_b, sdo_h, sdo_m, sdo_d, sdq_b, sdq_h, sdq_m, sdq_d,   # as in _fwd_kernel
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_DBIAS: tl.constexpr,
    DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, offs_m, offs_d, sq_m, sq_d, Sq, D)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, offs_m, offs_d, sdo_m, sdo_d, Sq, D)
    lse2, delta = _load_row_stats(lse_ptr, delta_ptr, bh, offs_m, Sq)
    bias_base = bias_ptr + b * sb_b + h * sb_h
    dbias_base = dbias_ptr + bh * Sq * (Sp + Sk)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_PREFIX:
        dq = _bwd_dq_segment(dq, q, do, lse2, delta, kp_ptr + b * skp_b + h * skp_h,
                             vp_ptr + b * svp_b + h * svp_h,
                             bias_base, dbias_base, offs_m, offs_d, 0, Sp, Sp, Sq, D, qk_scale,
                             skp_n, skp_d, svp_n, svp_d, sb_m, sb_n, Sp + Sk,
                             False, HAS_BIAS, WRITE_DBIAS, DOT_MODE, BLOCK_N)
    n_end = Sk
    if CAUSAL:
        n_end = tl.minimum(Sk, start_m + BLOCK_M)
    dq = _bwd_dq_segment(dq, q, do, lse2, delta, k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h,
                         bias_base, dbias_base, offs_m, offs_d, Sp, Sk, n_end, Sq, D, qk_scale,
                         sk_n, sk_d, sv_n, sv_d, sb_m, sb_n, Sp + Sk,
                         CAUSAL, HAS_BIAS, WRITE_DBIAS, DOT_MODE, BLOCK_N)
    mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
             _to(dq * scale, dq_ptr.dtype.element_ty, DOT_MODE), mask=mask)


def _config(D, dtype, device, backward, masked=False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). masked: a prefix, a bias or causal masking is on;
    their extra tiles (bias, masks) need more registers, so those variants get 8 warps (or smaller tiles):
    at 4 warps they spilled 0.3-5 KB per thread on sm_90a (benchmarks/results/gpu-static-sm90a.md)."""
    block_d = max(16, triton.next_power_of_2(D))
    if device.type != "cuda":
        return 16, 16, block_d, 4, 1  # the interpreter runs programs one by one: small tiles, fast tests
    wide = dtype == torch.float32 and block_d >= 128  # fp32 tiles take twice the shared memory
    if backward:  # two fp32 (BLOCK_N, BLOCK_D) accumulators live in registers
        if masked:  # + the bias / mask tiles: 64 x 64 spilled 72 B (dq), 32 x 32 at BLOCK_D 256 500 B (dkdv)
            block = 32 if block_d <= 128 else 16
        else:
            block = 64 if block_d <= 128 and not wide else 32
        return block, block, block_d, 8, 2  # 4 warps spilled even unmasked at BLOCK_D 64 (dkdv, 280 B)
    if block_d <= 64:  # masked: 128 x 64 spilled 2.8 KB at 8 warps; 64 x 64 4.3 KB at 4 warps, 36 B at 8
        return (64, 32, block_d, 4, 3) if masked else (128, 64, block_d, 4, 3)
    if block_d <= 128:
        return 64, 64 if not wide else 32, block_d, 8 if (wide or masked) else 4, 3 if not wide else 2
    return 64, 32, block_d, 8, 2


def _dot_mode(q):
    if q.dtype == torch.float32:
        return 1
    return 2 if q.dtype == torch.bfloat16 and q.device.type != "cuda" else 0


def _segments(q, k, v, kp, vp, bias):
    """Shared launch arguments: prefix and bias pointers (dummies when absent) and strides."""
    has_prefix = kp is not None and kp.shape[2] > 0
    Sp = kp.shape[2] if has_prefix else 0
    zeros4 = (0, 0, 0, 0)
    kp_, vp_ = (kp, vp) if has_prefix else (k, v)
    strides = (*q.stride(), *k.stride(), *v.stride(),
               *(kp.stride() if has_prefix else zeros4), *(vp.stride() if has_prefix else zeros4),
               *(bias.stride() if bias is not None else zeros4))
    return has_prefix, Sp, kp_, vp_, (bias if bias is not None else q), strides


def _check(q, k, v, kp, vp, bias):
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    assert k.shape == v.shape == (B, H, Sk, D), "attention: k and v must be (B, H, Sk, D) like q"
    assert (kp is None) == (vp is None), "attention: kp and vp come together"
    Sp = 0 if kp is None else kp.shape[2]
    if kp is not None:
        assert kp.shape == vp.shape == (B, H, Sp, D), "attention: kp and vp must be (B, H, Sp, D)"
    if bias is not None:
        assert bias.shape == (B, H, Sq, Sp + Sk), "attention: bias must be (B, H, Sq, Sp + Sk)"
    return B, H, Sq, Sk, Sp, D


def attention_forward(q, k, v, kp, vp, bias, causal, scale):
    """q (B, H, Sq, D); k, v (B, H, Sk, D); kp, vp (B, H, Sp, D) or both None (prefix keys/values attended
    before k/v, always visible); bias None or float (B, H, Sq, Sp + Sk), any strides (additive, -inf masks);
    causal: query i sees main key j <= i (top-left). Every input is read in place through its strides.
    Returns (out, lse): out (B, H, Sq, D) contiguous in q's dtype, lse (B, H, Sq) float32 natural log,
    -inf (and out = 0) for rows whose keys are all masked."""
    B, H, Sq, Sk, Sp, D = _check(q, k, v, kp, vp, bias)
    out = torch.empty((B, H, Sq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    masked = bool(causal) or bias is not None or (kp is not None and kp.shape[2] > 0)
    block_m, block_n, block_d, num_warps, num_stages = _config(D, q.dtype, q.device, backward=False,
                                                               masked=masked)
    has_prefix, Sp, kp_, vp_, bias_, strides = _segments(q, k, v, kp, vp, bias)
    grid = (triton.cdiv(Sq, block_m), B * H)
    _fwd_kernel[grid](q, k, v, kp_, vp_, bias_, out, lse, H, Sq, Sk, Sp, D, float(scale) * 1.4426950408889634,
                      *strides, *out.stride(),
                      CAUSAL=bool(causal), HAS_PREFIX=has_prefix, HAS_BIAS=bias is not None,
                      DOT_MODE=_dot_mode(q), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                      num_warps=num_warps, num_stages=num_stages)
    return out, lse


def attention_backward(do, q, k, v, kp, vp, bias, causal, scale, out, lse, need_dbias=False):
    """Gradients of attention_forward. Returns (dq, dk, dv, dkp, dvp, dbias), each contiguous in its input's
    dtype and shape; dkp/dvp None when kp is None; dbias None unless need_dbias, else float32
    (B, H, Sq, Sp + Sk) holding dL/d(bias) elementwise (the caller reduces it to the bias's shape)."""
    B, H, Sq, Sk, Sp, D = _check(q, k, v, kp, vp, bias)
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    dkp = torch.empty_like(kp, memory_format=torch.contiguous_format) if kp is not None else None
    dvp = torch.empty_like(vp, memory_format=torch.contiguous_format) if vp is not None else None
    dbias = torch.zeros((B, H, Sq, Sp + Sk), device=q.device, dtype=torch.float32) if need_dbias else None
    if B * H * D == 0 or Sq == 0:
        for t in (dq, dk, dv, dkp, dvp):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dkp, dvp, dbias
    masked = bool(causal) or bias is not None or (kp is not None and kp.shape[2] > 0)
    block_m, block_n, block_d, num_warps, num_stages = _config(D, q.dtype, q.device, backward=True,
                                                               masked=masked)
    has_prefix, Sp, kp_, vp_, bias_, strides = _segments(q, k, v, kp, vp, bias)
    lse = lse.contiguous()
    delta = torch.empty((B * H, Sq), device=q.device, dtype=torch.float32)
    _bwd_preprocess_kernel[(triton.cdiv(Sq, block_m), B * H)](
        out, do, delta, H, Sq, D, *out.stride(), *do.stride(), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8)
    flags = dict(CAUSAL=bool(causal), HAS_PREFIX=has_prefix, HAS_BIAS=bias is not None,
                 DOT_MODE=_dot_mode(q), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                 num_warps=num_warps, num_stages=num_stages)
    qk_scale = float(scale) * 1.4426950408889634
    dkp_, dvp_ = (dkp, dvp) if has_prefix else (dk, dv)
    zeros4 = (0, 0, 0, 0)
    grid = (triton.cdiv(Sp, block_n) + triton.cdiv(Sk, block_n), B * H)
    _bwd_dkdv_kernel[grid](q, k, v, kp_, vp_, bias_, do, lse, delta, dk, dv, dkp_, dvp_,
                           H, Sq, Sk, Sp, D, float(scale), qk_scale, *strides, *do.stride(),
                           *dk.stride(), *dv.stride(), *(dkp.stride() if has_prefix else zeros4),
                           *(dvp.stride() if has_prefix else zeros4), **flags)
    _bwd_dq_kernel[(triton.cdiv(Sq, block_m), B * H)](
        q, k, v, kp_, vp_, bias_, do, lse, delta, dq, dbias if need_dbias else delta,
        H, Sq, Sk, Sp, D, float(scale), qk_scale, *strides, *do.stride(), *dq.stride(),
        WRITE_DBIAS=bool(need_dbias), **flags)
    return dq, dk, dv, dkp, dvp, dbias
