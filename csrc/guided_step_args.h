// guided_step: one fused sampler step (CFG combine, x0/eps conversion, clipping, DDPM/DDIM update).
// Plain description of one call, shared by the CPU and CUDA kernels; no torch headers, so that
// csrc/cuda/guided_step.cu compiles with nothing but nvcc.
#pragma once
#include <cstdint>

#include "group_norm_args.h"  // DType

namespace diffkern {

// Every tensor is contiguous; per sample b: x, noise, prev, x0 are (N,) at b * N, model_output and
// uncond are (M_stride,) at b * M_stride (M_stride = N, or 2N with the learned variance values v in
// [N, 2N)). See diffkern/ops/guided_step.py for the math.
struct GuidedStepArgs {
  const void* x = nullptr;          // sample, dtype
  const void* m = nullptr;          // model_output (conditional), dtype
  const void* u = nullptr;          // uncond_output, dtype, or null
  const void* noise = nullptr;      // dtype, or null (no noise term unless seeded)
  const float* coeffs = nullptr;    // (B, K): sa, s1m, c_x0, c_xt, c_eps, sigma(, min_log, max_log)
  const float* thresholds = nullptr;// (B,) dynamic thresholds s, with clip == 2 (not stats_only)
  void* prev = nullptr;             // output, dtype
  void* x0 = nullptr;               // output, dtype (x0 after clipping)
  float* abs_out = nullptr;         // stats_only: (B, N) float32 |unclipped x0|; nothing else written
  int64_t B = 0, N = 0, M_stride = 0, K = 6;
  int pred = 0;                     // 0 epsilon, 1 sample, 2 v_prediction
  int clip = 0;                     // 0 none, 1 static, 2 dynamic
  bool learned = false;             // variance == "learned_range"
  bool eps_from_clipped = true;     // the eps term from the clipped x0 (else from the raw prediction)
  bool seeded = false;              // noise drawn in the kernel: philox_normal(seed, offset + b * N + i)
  uint64_t seed = 0, offset = 0;
  float guidance_scale = 1.0f;
  float clip_range = 1.0f;
  DType dtype = DType::kFloat32;
};

}  // namespace diffkern
