// CUDA sampler_update: one elementwise pass (see diffkern/ops/sampler_update.py for the math and
// csrc/sampler_update_args.h for the layout). Grid (chunks, B): a block owns kChunk elements of one
// sample, so the coefficients are block-uniform scalars and the history loop's branches are taken
// the same way by every thread (no divergence). Loads are coalesced; the op is memory-bound.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "sampler_update.h"
#include "float_io.cuh"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;
constexpr int64_t kMaxGridY = 65535;

// clamp(v, lo, hi) that keeps a NaN v (fminf / fmaxf return the other operand): clipping never turns
// a NaN d into a bound (as guided_step.cu)
__device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) {
  return v != v ? v : fminf(fmaxf(v, lo), hi);
}

template <typename T, bool STATS>
__global__ void __launch_bounds__(kThreads) sampler_update_kernel(SamplerUpdateArgs a) {
  const int64_t b = blockIdx.y;
  const int H = a.H;
  const float* c = a.coeffs + b * a.K;
  const float cx = c[0], cp = c[1], ca = c[2], cb = c[3], std_ = c[4 + H];
  const bool with_aux = a.aux != nullptr;
  const float a2 = with_aux ? c[5 + H] : 0.0f, b2 = with_aux ? c[6 + H] : 0.0f;
  const float thr = (a.clip == 2 && !STATS) ? a.thresholds[b] : 1.0f;
  const int64_t row = b * a.N;
  const T* xb = static_cast<const T*>(a.x) + row;
  const T* mb = static_cast<const T*>(a.m) + row;
  const T* ub = a.u ? static_cast<const T*>(a.u) + row : nullptr;
  const T* zb = a.noise ? static_cast<const T*>(a.noise) + row : nullptr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < a.N ? begin + kChunk : a.N;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float x = load_f(xb, i);
    float pred = load_f(mb, i);
    if (ub) {
      const float un = load_f(ub, i);
      pred = un + a.guidance_scale * (pred - un);
    }
    float d = cx * x + cp * pred;
    if (STATS) {
      a.abs_out[row + i] = fabsf(d);
      continue;
    }
    if (a.clip == 1) {
      d = clamp_keep_nan(d, -a.clip_range, a.clip_range);
    } else if (a.clip == 2) {
      d = clamp_keep_nan(d, -thr, thr) / thr;  // a NaN thr: fminf/fmaxf pass d, / thr gives NaN
    }
    float o = ca * x + cb * d;
    float q = a2 * x + b2 * d;
#pragma unroll
    for (int j = 0; j < kSamplerMaxHistory; ++j) {
      if (j >= H) break;
      const float cj = c[4 + j], dj = with_aux ? c[7 + H + j] : 0.0f;
      if (cj == 0.0f && dj == 0.0f) continue;  // a zero coefficient drops the term
      const float h = load_f(static_cast<const T*>(a.h[j]) + row, i);
      if (cj != 0.0f) o += cj * h;
      if (dj != 0.0f) q += dj * h;
    }
    if (zb && std_ != 0.0f) o += std_ * load_f(zb, i);
    store_f(static_cast<T*>(a.out) + row, i, o);
    store_f(static_cast<T*>(a.d) + row, i, d);
    if (with_aux) store_f(static_cast<T*>(a.aux) + row, i, q);
  }
}

template <typename T>
cudaError_t launch(const SamplerUpdateArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.N + kChunk - 1) / kChunk), static_cast<unsigned>(a.B));
  if (a.abs_out != nullptr) {
    sampler_update_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    sampler_update_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sampler_update_forward(const SamplerUpdateArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if (a.B > kMaxGridY || (a.N + kChunk - 1) / kChunk > 0x7fffffff) return cudaErrorInvalidValue;
  if (a.H < 0 || a.H > kSamplerMaxHistory) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace diffkern
