// CUDA sampler_update: a plain launcher on raw pointers (no torch headers), so that
// `nvcc -c -arch=sm_90 csrc/cuda/sampler_update.cu` checks the kernel on any machine.
#pragma once
#include <cuda_runtime_api.h>

#include "../sampler_update_args.h"

namespace diffkern {
namespace cuda {

// One pass on `stream` (no host synchronisation): with args.abs_out the statistics pass (|d| only),
// else the update pass writing out, d (and aux). Returns the launch error; never throws.
cudaError_t sampler_update_forward(const SamplerUpdateArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
