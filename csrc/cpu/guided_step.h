// CPU guided_step kernel (see csrc/guided_step_args.h for the arguments).
#pragma once
#include "../guided_step_args.h"

namespace diffkern {
namespace cpu {

// One pass over the elements (at::vec, at::parallel_for). Arguments were validated by the binding.
void guided_step_forward(const GuidedStepArgs& args);

}  // namespace cpu
}  // namespace diffkern
