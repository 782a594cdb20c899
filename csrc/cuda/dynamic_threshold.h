// CUDA dynamic thresholding: plain launchers on raw pointers (no torch headers), so that
// `nvcc -c -arch=sm_90 csrc/cuda/dynamic_threshold.cu` checks the kernels on any machine.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>
#include "../dynamic_threshold_args.h"

namespace diffkern {
namespace cuda {

// Bytes of scratch dynamic_threshold_forward needs for a batch of B samples.
int64_t dynamic_threshold_workspace_bytes(int64_t B);

// Launches the whole op on `stream` (no host synchronisation): three digit-histogram passes of
// an exact radix select per sample, then the apply pass; writes y and thresholds. `workspace`
// holds dynamic_threshold_workspace_bytes(B) bytes of any content, 16-byte aligned. Returns the
// first launch error (cudaSuccess on success); never throws.
cudaError_t dynamic_threshold_forward(const DynamicThresholdArgs& args, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace diffkern
