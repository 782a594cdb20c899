// CUDA dynamic thresholding by radix select (no sort); the same algorithm as the Triton backend.
//
// Keys are the float32 bit patterns of |x| (order-preserving for non-negative floats, NaN above
// +inf). Ranks lo = floor(p (n-1)) and hi = ceil(p (n-1)) are searched together, each with its own
// prefix (they may part). Per level (bits 20..30, 10..19, 0..9):
//   dt_hist_kernel:   (chunks, B) blocks, per-block shared-memory histograms of the digit of the keys
//                     that match each rank's prefix, flushed with global atomics;
//   dt_select_kernel: one thread per (sample, rank) scans the bins: next digit, rank within it.
// After three levels the prefixes are the exact keys; dt_finalize_kernel computes s_b (double
// lerp, max 1, min max_value, NaN when the sample has a NaN) and dt_apply_kernel writes
// y = clamp(x, -s, s) / s. Everything is queued on one stream, no host synchronisation.
// Element offsets are int64; counts per sample are uint32 (n < 2^32, checked by the launcher).

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "../dynamic_threshold_args.h"
#include "dynamic_threshold.h"
#include "float_io.cuh"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBins = 2048;
constexpr int64_t kChunk = 16384;   // elements per histogram block
constexpr int64_t kApplyChunk = 4096;
constexpr int kMaxGridY = 65535;
constexpr uint32_t kInfKey = 0x7f800000u;

struct Workspace {
  uint32_t* hist;    // (B, 2, kMaxBins)
  uint64_t* rank;    // (B, 2) rank within the current prefix
  uint32_t* prefix;  // (B, 2) high bits found so far
  uint32_t* nan;     // (B,) NaN count
};

Workspace carve(void* ws, int64_t B) {
  char* p = static_cast<char*>(ws);
  Workspace w;
  w.hist = reinterpret_cast<uint32_t*>(p);
  p += B * 2 * kMaxBins * sizeof(uint32_t);
  w.rank = reinterpret_cast<uint64_t*>(p);
  p += B * 2 * sizeof(uint64_t);
  w.prefix = reinterpret_cast<uint32_t*>(p);
  p += B * 2 * sizeof(uint32_t);
  w.nan = reinterpret_cast<uint32_t*>(p);
  return w;
}

__global__ void dt_init_kernel(Workspace w, int64_t B, uint64_t lo, uint64_t hi) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  w.rank[2 * b] = lo;
  w.rank[2 * b + 1] = hi;
  w.prefix[2 * b] = 0;
  w.prefix[2 * b + 1] = 0;
  w.nan[b] = 0;
}

template <typename T, int SHIFT, int BITS, bool COUNT_NAN>
__global__ void __launch_bounds__(kThreads) dt_hist_kernel(const T* __restrict__ x, Workspace w, int64_t n,
                                                           int64_t b_offset) {
  constexpr int kBins = 1 << BITS;
  constexpr int kHigh = SHIFT + BITS;  // 31 on the top level: every key matches
  __shared__ uint32_t sh[2][kBins];
  const int64_t b = b_offset + blockIdx.y;
  for (int i = threadIdx.x; i < 2 * kBins; i += kThreads) (&sh[0][0])[i] = 0;
  __syncthreads();
  const uint32_t p_lo = w.prefix[2 * b] >> kHigh;
  const uint32_t p_hi = w.prefix[2 * b + 1] >> kHigh;
  const T* xb = x + b * n;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  uint32_t nan = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = __float_as_uint(load_f(xb, i)) & 0x7fffffffu;
    const uint32_t digit = (key >> SHIFT) & (kBins - 1);
    const uint32_t high = key >> kHigh;
    if (high == p_lo) atomicAdd(&sh[0][digit], 1u);
    if (high == p_hi) atomicAdd(&sh[1][digit], 1u);
    if (COUNT_NAN) nan += key > kInfKey;
  }
  if (COUNT_NAN) {
    for (int off = 16; off > 0; off >>= 1) nan += __shfl_down_sync(0xffffffffu, nan, off);
    if ((threadIdx.x & 31) == 0 && nan) atomicAdd(&w.nan[b], nan);
  }
  __syncthreads();
  uint32_t* gh = w.hist + b * 2 * kMaxBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    if (sh[0][i]) atomicAdd(&gh[i], sh[0][i]);
    if (sh[1][i]) atomicAdd(&gh[kMaxBins + i], sh[1][i]);
  }
}

// One thread per (sample, rank): the bin holding the rank becomes the next digit of its prefix.
template <int SHIFT, int BITS>
__global__ void dt_select_kernel(Workspace w, int64_t B) {
  constexpr int kBins = 1 << BITS;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= 2 * B) return;
  const uint32_t* h = w.hist + (t / 2) * 2 * kMaxBins + (t % 2) * kMaxBins;
  uint64_t r = w.rank[t];
  uint64_t cum = 0;
  int digit = kBins - 1;
  for (int d = 0; d < kBins; ++d) {
    if (r < cum + h[d]) {
      digit = d;
      break;
    }
    cum += h[d];
  }
  w.rank[t] = r - cum;
  w.prefix[t] |= static_cast<uint32_t>(digit) << SHIFT;
}

__global__ void dt_finalize_kernel(Workspace w, float* thresholds, int64_t B, double pos, uint64_t lo,
                                   bool has_max, double max_value) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  if (w.nan[b] > 0) {
    thresholds[b] = __int_as_float(0x7fc00000);
    return;
  }
  const uint32_t k_lo = w.prefix[2 * b], k_hi = w.prefix[2 * b + 1];
  const double v_lo = __uint_as_float(k_lo), v_hi = __uint_as_float(k_hi);
  const double wgt = pos - static_cast<double>(lo);
  double s = (k_lo == k_hi || wgt == 0.0) ? v_lo : v_lo + wgt * (v_hi - v_lo);
  s = s > 1.0 ? s : 1.0;
  if (has_max && s > max_value) s = max_value;
  thresholds[b] = static_cast<float>(s);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dt_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                            const float* __restrict__ thresholds, int64_t n,
                                                            int64_t b_offset) {
  const int64_t b = b_offset + blockIdx.y;
  const float s = thresholds[b];
  const bool nan_s = isnan(s);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kApplyChunk;
  const int64_t end = begin + kApplyChunk < n ? begin + kApplyChunk : n;
  const T* xb = x + b * n;
  T* yb = y + b * n;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float v = load_f(xb, i);
    store_f(yb, i, nan_s ? s : fminf(fmaxf(v, -s), s) / s);
  }
}

template <typename T>
cudaError_t forward_typed(const DynamicThresholdArgs& a, Workspace w, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t B = a.B, n = a.n;
  const double pos = a.percentile * static_cast<double>(n - 1);
  uint64_t lo = static_cast<uint64_t>(std::floor(pos)), hi = static_cast<uint64_t>(std::ceil(pos));
  if (lo > static_cast<uint64_t>(n - 1)) lo = n - 1;
  if (hi > static_cast<uint64_t>(n - 1)) hi = n - 1;
  const int small_blocks = static_cast<int>((B + 127) / 128);
  dt_init_kernel<<<small_blocks, 128, 0, stream>>>(w, B, lo, hi);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned chunks = static_cast<unsigned>((n + kChunk - 1) / kChunk);
  const unsigned apply_chunks = static_cast<unsigned>((n + kApplyChunk - 1) / kApplyChunk);
  const int select_blocks = static_cast<int>((2 * B + 127) / 128);
  for (int level = 0; level < 3; ++level) {
    err = cudaMemsetAsync(w.hist, 0, B * 2 * kMaxBins * sizeof(uint32_t), stream);
    if (err != cudaSuccess) return err;
    for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY) {
      const dim3 grid(chunks, static_cast<unsigned>(B - b0 < kMaxGridY ? B - b0 : kMaxGridY));
      if (level == 0) dt_hist_kernel<T, 20, 11, true><<<grid, kThreads, 0, stream>>>(x, w, n, b0);
      else if (level == 1) dt_hist_kernel<T, 10, 10, false><<<grid, kThreads, 0, stream>>>(x, w, n, b0);
      else dt_hist_kernel<T, 0, 10, false><<<grid, kThreads, 0, stream>>>(x, w, n, b0);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (level == 0) dt_select_kernel<20, 11><<<select_blocks, 128, 0, stream>>>(w, B);
    else if (level == 1) dt_select_kernel<10, 10><<<select_blocks, 128, 0, stream>>>(w, B);
    else dt_select_kernel<0, 10><<<select_blocks, 128, 0, stream>>>(w, B);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  dt_finalize_kernel<<<small_blocks, 128, 0, stream>>>(w, a.thresholds, B, pos, lo, a.has_max, a.max_value);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  for (int64_t b0 = 0; y != nullptr && b0 < B; b0 += kMaxGridY) {
    const dim3 grid(apply_chunks, static_cast<unsigned>(B - b0 < kMaxGridY ? B - b0 : kMaxGridY));
    dt_apply_kernel<T><<<grid, kThreads, 0, stream>>>(x, y, a.thresholds, n, b0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t dynamic_threshold_workspace_bytes(int64_t B) {
  return B * 2 * kMaxBins * static_cast<int64_t>(sizeof(uint32_t)) + B * 2 * static_cast<int64_t>(sizeof(uint64_t)) +
         B * 2 * static_cast<int64_t>(sizeof(uint32_t)) + B * static_cast<int64_t>(sizeof(uint32_t));
}

cudaError_t dynamic_threshold_forward(const DynamicThresholdArgs& a, void* workspace, cudaStream_t stream) {
  if (a.B == 0 || a.n == 0) return cudaSuccess;
  // uint32 counts per sample; grid.x chunk counts fit in 31 bits for any n below that
  if (a.n >= (int64_t{1} << 32)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, a.B);
  switch (a.dtype) {
    case DTDType::kFloat32: return forward_typed<float>(a, w, stream);
    case DTDType::kFloat16: return forward_typed<__half>(a, w, stream);
    case DTDType::kBFloat16: return forward_typed<__nv_bfloat16>(a, w, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace diffkern
