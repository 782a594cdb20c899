// CPU guided_step: the portable (DEFAULT) build of guided_step_impl.h, plus the run-time dispatch to
// the AVX512 (guided_step_avx512.cpp) and AVX2 (guided_step_avx2.cpp) builds where the CPU has them.
#include "guided_step.h"

#include "cpu_isa.h"

#define CPU_CAPABILITY DEFAULT
#include "guided_step_impl.h"

namespace diffkern {
namespace cpu {

#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
namespace AVX2 {
void guided_step_forward_impl(const GuidedStepArgs& a);  // guided_step_avx2.cpp
}  // namespace AVX2
namespace AVX512 {
void guided_step_forward_impl(const GuidedStepArgs& a);  // guided_step_avx512.cpp
}  // namespace AVX512
#endif

void guided_step_forward(const GuidedStepArgs& args) {
#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
  switch (cpu_isa()) {
    case Isa::kAvx512: AVX512::guided_step_forward_impl(args); return;
    case Isa::kAvx2: AVX2::guided_step_forward_impl(args); return;
    default: break;
  }
#endif
  DEFAULT::guided_step_forward_impl(args);
}

}  // namespace cpu
}  // namespace diffkern
