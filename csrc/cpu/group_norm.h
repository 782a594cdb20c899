// CPU group_norm forward: vectorised with at::vec, parallel with at::parallel_for.
#pragma once
#include "../group_norm_args.h"

namespace diffkern {
namespace cpu {

// Computes y, mean and rstd as described in GroupNormArgs. Arguments were validated by the
// binding; this only asserts layout assumptions (TORCH_CHECK, never aborts).
void group_norm_forward(const GroupNormArgs& args);

// The instruction set the kernel picked at run time: "avx512", "avx2" or "default".
const char* group_norm_capability();

}  // namespace cpu
}  // namespace diffkern
