// CPU sampler_update: the portable (DEFAULT) build of sampler_update_impl.h, plus the run-time dispatch
// to the AVX512 (sampler_update_avx512.cpp) and AVX2 (sampler_update_avx2.cpp) builds where the CPU has
// them (the DEFAULT build's vector type is SSE-wide at best: ~3x slower per element, measured).
#include "sampler_update.h"

#include "cpu_isa.h"

#define CPU_CAPABILITY DEFAULT
#include "sampler_update_impl.h"

namespace diffkern {
namespace cpu {

#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
namespace AVX2 {
void sampler_update_forward_impl(const SamplerUpdateArgs& a);  // sampler_update_avx2.cpp
}  // namespace AVX2
namespace AVX512 {
void sampler_update_forward_impl(const SamplerUpdateArgs& a);  // sampler_update_avx512.cpp
}  // namespace AVX512
#endif

void sampler_update_forward(const SamplerUpdateArgs& args) {
#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
  switch (cpu_isa()) {
    case Isa::kAvx512: AVX512::sampler_update_forward_impl(args); return;
    case Isa::kAvx2: AVX2::sampler_update_forward_impl(args); return;
    default: break;
  }
#endif
  DEFAULT::sampler_update_forward_impl(args);
}

}  // namespace cpu
}  // namespace diffkern
