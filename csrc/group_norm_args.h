// Plain description of one group_norm forward call, shared by the CPU and CUDA kernels.
// No torch headers here, so that csrc/cuda/*.cu compiles with nothing but nvcc.
#pragma once
#include <cstdint>

namespace diffkern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift), per group of C / G channels.
// x and y share one layout: element (n, c, s) lives at n * stride_n + c * stride_c + s * stride_s
// (elements, not bytes), where s indexes the flattened spatial dims. The binding only ever passes
// the two layouts the kernels are written for:
//   contiguous     (NC*):  stride_c == S, stride_s == 1
//   channels_last  (N*C):  stride_c == 1, stride_s == C
// and stride_n == C * S in both.
struct GroupNormArgs {
  const void* x = nullptr;      // input, dtype
  void* y = nullptr;            // output, dtype, same strides as x
  const void* weight = nullptr; // (C,) dtype, or null (= 1)
  const void* bias = nullptr;   // (C,) dtype, or null (= 0)
  const void* scale = nullptr;  // (N, C) contiguous dtype, or null (= 0); set together with shift
  const void* shift = nullptr;  // (N, C) contiguous dtype, or null (= 0)
  float* mean = nullptr;        // (N, G) float32 output: group means
  float* rstd = nullptr;        // (N, G) float32 output: 1 / sqrt(var + eps), biased variance
  int64_t N = 0, C = 0, S = 0, G = 0;
  int64_t stride_n = 0, stride_c = 0, stride_s = 0;
  bool channels_last = false;   // true iff stride_c == 1 (and C > 1 or S == 1)
  float eps = 1e-5f;
  int activation = 0;           // 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh form)
  DType dtype = DType::kFloat32;
};

}  // namespace diffkern
