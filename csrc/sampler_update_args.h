// sampler_update: the fused element-wise update of multistep / Euler-type samplers. Plain
// description of one call, shared by the CPU and CUDA kernels; no torch headers, so that
// csrc/cuda/sampler_update.cu compiles with nothing but nvcc. See diffkern/ops/sampler_update.py.
#pragma once
#include <cstdint>

#include "group_norm_args.h"  // DType

namespace diffkern {

constexpr int kSamplerMaxHistory = 6;

// Every tensor is contiguous (B, N). Coefficient row of sample b (float32, K per row):
//   cx, cp, a, b, c_1..c_H, std(, a2, b2, d_1..d_H)
//   d = clip(cx x + cp pred); out = a x + b d + sum c_j h_j + std z; aux = a2 x + b2 d + sum d_j h_j
struct SamplerUpdateArgs {
  const void* x = nullptr;                       // sample, dtype
  const void* m = nullptr;                       // model_output (conditional), dtype
  const void* u = nullptr;                       // uncond_output, dtype, or null
  const void* noise = nullptr;                   // dtype, or null
  const void* h[kSamplerMaxHistory] = {};        // history tensors, dtype
  int H = 0;                                     // number of history tensors
  const float* coeffs = nullptr;                 // (B, K)
  const float* thresholds = nullptr;             // (B,) with clip == 2 (not the statistics pass)
  void* out = nullptr;                           // output, dtype
  void* d = nullptr;                             // output, dtype: the denoised value after clipping
  void* aux = nullptr;                           // output, dtype, or null
  float* abs_out = nullptr;                      // statistics pass: (B, N) float32 |unclipped d| only
  int64_t B = 0, N = 0, K = 5;
  int clip = 0;                                  // 0 none, 1 static, 2 dynamic
  float guidance_scale = 1.0f;
  float clip_range = 1.0f;
  DType dtype = DType::kFloat32;
};

}  // namespace diffkern
