// CPU sampler_update kernel (see csrc/sampler_update_args.h for the arguments).
#pragma once
#include "../sampler_update_args.h"

namespace diffkern {
namespace cpu {

// One pass over the elements (at::parallel_for over (sample, chunk)). Validated by the binding.
void sampler_update_forward(const SamplerUpdateArgs& args);

}  // namespace cpu
}  // namespace diffkern
