// CPU dynamic thresholding (Imagen / diffusers DDPMScheduler._threshold_sample) by radix selection.
#pragma once
#include "../dynamic_threshold_args.h"

namespace diffkern {
namespace cpu {

// Per sample: s = quantile(|x|, percentile) ('linear', exact order statistics found by radix
// select over the float32 bit patterns of |x|), s = max(s, 1), s = min(s, max_value); then
// y = clamp(x, -s, s) / s. A sample holding a NaN gets s = NaN and an all-NaN output.
// Arguments were validated by the binding.
void dynamic_threshold_forward(const DynamicThresholdArgs& args);

}  // namespace cpu
}  // namespace diffkern
