// CUDA group_norm forward: plain launchers on raw pointers (no torch headers), so that
// `nvcc -c -arch=sm_90 csrc/cuda/group_norm_*.cu` checks the kernels on any machine (plans: group_norm_common.cuh).
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include "../group_norm_args.h"

namespace diffkern {
namespace cuda {

// float32 scratch elements group_norm_forward needs for these arguments (may be 0).
int64_t group_norm_workspace_elems(const GroupNormArgs& args, int num_sms);

// Launches the forward on `stream`. `workspace` holds group_norm_workspace_elems(args, num_sms)
// floats of any content. Returns the launch error (cudaSuccess on success); never throws.
cudaError_t group_norm_forward(const GroupNormArgs& args, float* workspace, int num_sms,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
