// CUDA guided_step: a plain launcher on raw pointers (no torch headers), so that
// `nvcc -c -arch=sm_90 csrc/cuda/guided_step.cu` checks the kernel on any machine.
#pragma once
#include <cuda_runtime_api.h>

#include "../guided_step_args.h"

namespace diffkern {
namespace cuda {

// One pass on `stream` (no host synchronisation): with args.abs_out the statistics pass (|x0|
// only), else the update pass writing prev and x0. Returns the launch error (cudaSuccess on
// success; cudaErrorInvalidValue for B > 65535); never throws.
cudaError_t guided_step_forward(const GuidedStepArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
