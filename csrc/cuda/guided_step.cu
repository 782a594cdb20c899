// CUDA guided_step: one elementwise pass (see diffkern/ops/guided_step.py for the math and
// csrc/guided_step_args.h for the layout). Grid (chunks, B): a block owns kChunk elements of one
// sample, so the per-sample coefficients are block-uniform scalars; the prediction type and clip
// mode are runtime branches that every thread of the grid takes the same way (no divergence), so
// only the storage type and the statistics pass are template parameters. Loads are coalesced
// (consecutive threads, consecutive elements); the op is memory-bound and does a few flops per
// byte. Seeded noise comes from csrc/philox.h (identical on every backend).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "../philox.h"
#include "guided_step.h"
#include "float_io.cuh"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per block: 16 per thread
constexpr int64_t kMaxGridY = 65535;

// clamp(v, lo, hi) that keeps a NaN v (fminf / fmaxf return the other operand): a NaN prediction
// stays NaN, as on every other backend (tests/ops/test_nonfinite.py)
__device__ __forceinline__ float clamp_keep_nan(float v, float lo, float hi) {
  return v != v ? v : fminf(fmaxf(v, lo), hi);
}

template <typename T, bool STATS>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(GuidedStepArgs a) {
  const int64_t b = blockIdx.y;
  const float* c = a.coeffs + b * a.K;
  const float sa = c[0], s1m = c[1];
  const float c_x0 = c[2], c_xt = c[3], c_eps = c[4], sigma = c[5];
  const float min_log = a.learned ? c[6] : 0.0f, max_log = a.learned ? c[7] : 0.0f;
  const float thr = (a.clip == 2 && !STATS) ? a.thresholds[b] : 1.0f;
  const T* xb = static_cast<const T*>(a.x) + b * a.N;
  const T* mb = static_cast<const T*>(a.m) + b * a.M_stride;
  const T* ub = a.u ? static_cast<const T*>(a.u) + b * a.M_stride : nullptr;
  const T* zb = a.noise ? static_cast<const T*>(a.noise) + b * a.N : nullptr;
  const bool has_noise = zb != nullptr || a.seeded;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < a.N ? begin + kChunk : a.N;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float x = load_f(xb, i);
    float pred = load_f(mb, i);
    if (ub) {
      const float un = load_f(ub, i);
      pred = un + a.guidance_scale * (pred - un);
    }
    float x0 = a.pred == 0 ? (x - s1m * pred) / sa : a.pred == 1 ? pred : sa * x - s1m * pred;
    const float x0_raw = x0;
    if (STATS) {
      a.abs_out[b * a.N + i] = fabsf(x0);
      continue;
    }
    if (a.clip == 1) {
      x0 = clamp_keep_nan(x0, -a.clip_range, a.clip_range);
    } else if (a.clip == 2) {
      x0 = clamp_keep_nan(x0, -thr, thr) / thr;  // a NaN thr: fminf/fmaxf pass x0, / thr gives NaN
    }
    float out = c_x0 * x0 + c_xt * x;
    if (c_eps != 0.0f) {  // a zero c_eps drops the term (eps may be inf where s1m == 0)
      const bool from_x0 = a.pred == 1 || (a.clip != 0 && a.eps_from_clipped);
      const float eps = from_x0       ? (x - sa * (a.eps_from_clipped ? x0 : x0_raw)) / s1m
                        : a.pred == 0 ? pred
                                      : sa * pred + s1m * x;
      out += c_eps * eps;
    }
    if (has_noise) {
      float std = sigma;
      if (a.learned) {
        const float frac = (load_f(mb, a.N + i) + 1.0f) * 0.5f;
        std = expf(0.5f * (frac * max_log + (1.0f - frac) * min_log));
      }
      const float z = a.seeded ? philox_normal(a.seed, a.offset + static_cast<uint64_t>(b * a.N + i)) : load_f(zb, i);
      out += std * z;
    }
    store_f(static_cast<T*>(a.prev) + b * a.N, i, out);
    store_f(static_cast<T*>(a.x0) + b * a.N, i, x0);
  }
}

template <typename T>
cudaError_t launch(const GuidedStepArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.N + kChunk - 1) / kChunk), static_cast<unsigned>(a.B));
  if (a.abs_out != nullptr) {
    guided_step_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    guided_step_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t guided_step_forward(const GuidedStepArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  // grid.y holds the batch; grid.x the chunks of one sample (2^31 - 1 chunks: any realistic N)
  if (a.B > kMaxGridY || (a.N + kChunk - 1) / kChunk > 0x7fffffff) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a, stream);
    case DType::kFloat16: return launch<__half>(a, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace diffkern
