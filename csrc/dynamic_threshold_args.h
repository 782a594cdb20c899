// Arguments of the dynamic_threshold kernels (CPU and CUDA): plain data, no torch headers.
#pragma once
#include <cstdint>

namespace diffkern {

enum class DTDType : int { kFloat32, kFloat16, kBFloat16 };

struct DynamicThresholdArgs {
  const void* x = nullptr;      // (B, n) contiguous, dtype
  void* y = nullptr;            // (B, n) contiguous, dtype; null: compute the thresholds only
  float* thresholds = nullptr;  // (B,) the divisor s_b actually used (NaN for samples with NaN)
  DTDType dtype = DTDType::kFloat32;
  int64_t B = 0;
  int64_t n = 0;                // elements per sample
  double percentile = 0.995;    // in [0, 1]
  bool has_max = false;
  double max_value = 0.0;       // >= 1 when has_max
};

}  // namespace diffkern
