"""Triton dynamic thresholding: exact radix select in three digit-histogram passes, then apply.

The two order statistics of |x_b| (ranks lo = floor(p (n-1)) and hi = ceil(p (n-1))) are found on
the float32 bit patterns of |x| (order-preserving for non-negative floats, NaN above +inf). Each
pass histograms one digit (bits 20..30, then 10..19, then 0..9) of the keys that match the prefix
found so far, for both ranks at once (their prefixes may part); tiny torch ops on the device turn
the histograms into the next digit and the rank within it (no host sync). After the third pass the
prefixes are the exact keys. The apply pass writes clamp(x, -s, s) / s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# clamps keep NaN (tl.minimum / tl.maximum drop it by default)
_NAN = tl.constexpr(tl.PropagateNan.ALL)

# (shift, bits) of the three digits; bit 31 of |x|'s pattern is always 0
LEVELS = ((20, 11), (10, 10), (0, 10))
MAX_BINS = 2048
HIST_BLOCK = 1024   # elements per tile of the histogram kernel
HIST_TILES = 8      # tiles per program: one atomic flush of the bins per 8K elements
APPLY_BLOCK = 1024


@triton.jit
def _hist_kernel(x_ptr, prefix_ptr, hist_ptr, nan_ptr, n,
                 SHIFT: tl.constexpr, BITS: tl.constexpr, COUNT_NAN: tl.constexpr,
                 BLOCK: tl.constexpr, TILES: tl.constexpr, MAXB: tl.constexpr):
    # x_ptr: (B, n) contiguous; prefix_ptr: (B, 2) int32 high bits found so far for ranks lo, hi;
    # hist_ptr: (B, 2, MAXB) int32, zeroed, accumulated with atomics; nan_ptr: (B,) int32.
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    BINS: tl.constexpr = 1 << BITS
    HIGH: tl.constexpr = SHIFT + BITS
    p_lo = tl.load(prefix_ptr + 2 * b) >> HIGH
    p_hi = tl.load(prefix_ptr + 2 * b + 1) >> HIGH
    h_lo = tl.zeros([BINS], dtype=tl.int32)
    h_hi = tl.zeros([BINS], dtype=tl.int32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for t in range(TILES):
        offs = (chunk * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        v = tl.load(x_ptr + b * n + offs, mask=m, other=0.0).to(tl.float32)
        key = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        digit = (key >> SHIFT) & (BINS - 1)
        high = key >> HIGH
        h_lo += tl.histogram(digit, BINS, mask=m & (high == p_lo))
        h_hi += tl.histogram(digit, BINS, mask=m & (high == p_hi))
        if COUNT_NAN:
            nan += (m & (key > 0x7F800000)).to(tl.int32)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + b * 2 * MAXB + bins, h_lo)
    tl.atomic_add(hist_ptr + b * 2 * MAXB + MAXB + bins, h_hi)
    if COUNT_NAN:
        tl.atomic_add(nan_ptr + b, tl.sum(nan, axis=0))


@triton.jit
def _apply_kernel(x_ptr, y_ptr, s_ptr, n, BLOCK: tl.constexpr):
    # y = clamp(x, -s_b, s_b) / s_b in float32, NaN everywhere when s_b is NaN.
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(s_ptr + b)
    v = tl.load(x_ptr + b * n + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.minimum(tl.maximum(v, -s, propagate_nan=_NAN), s, propagate_nan=_NAN) / s
    y = tl.where(s != s, float("nan"), y)
    tl.store(y_ptr + b * n + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def dynamic_threshold_forward(x, percentile, max_value, out=None):
    """x: (B, ...) contiguous float32/float16/bfloat16 -> (y, thresholds (B,) float32)."""
    B = x.shape[0]
    n = x.numel() // B
    dev = x.device
    y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError("dynamic_threshold: out must be contiguous and match x's shape and dtype")
    pos = percentile * (n - 1)
    lo, hi = int(pos // 1), min(int(-(-pos // 1)), n - 1)
    rank = torch.tensor([lo, hi], dtype=torch.int64, device=dev).repeat(B, 1)
    prefix = torch.zeros(B, 2, dtype=torch.int32, device=dev)
    hist = torch.empty(B, 2, MAX_BINS, dtype=torch.int32, device=dev)
    nan = torch.zeros(B, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(n, HIST_BLOCK * HIST_TILES), B)
    for i, (shift, bits) in enumerate(LEVELS):
        hist.zero_()
        _hist_kernel[grid](x, prefix, hist, nan, n, SHIFT=shift, BITS=bits, COUNT_NAN=(i == 0),
                           BLOCK=HIST_BLOCK, TILES=HIST_TILES, MAXB=MAX_BINS)
        cum = hist[:, :, : 1 << bits].to(torch.int64).cumsum(-1)
        digit = (cum <= rank.unsqueeze(-1)).sum(-1)          # the bin holding each rank
        before = torch.gather(cum - hist[:, :, : 1 << bits], 2, digit.unsqueeze(-1)).squeeze(-1)
        rank = rank - before
        prefix = prefix | (digit.to(torch.int32) << shift)
    v = prefix.view(torch.float32).double()
    v_lo, v_hi = v[:, 0], v[:, 1]
    s = torch.where(v_lo == v_hi, v_lo, v_lo + (pos - lo) * (v_hi - v_lo))
    s = torch.where(nan > 0, torch.full_like(s, float("nan")), s).clamp(min=1.0)
    if max_value is not None:
        s = s.clamp(max=max_value)
    s = s.float()
    _apply_kernel[(triton.cdiv(n, APPLY_BLOCK), B)](x, y, s, n, BLOCK=APPLY_BLOCK)
    return y, s
