// CPU group_norm forward: the portable (DEFAULT) build of group_norm_impl.h, plus the run-time
// dispatch to the AVX512 (group_norm_avx512.cpp) and AVX2 (group_norm_avx2.cpp) builds on x86-64
// CPUs that support them.
#include "group_norm.h"
#include "cpu_isa.h"

#define CPU_CAPABILITY DEFAULT
#include "group_norm_impl.h"


namespace diffkern {
namespace cpu {

#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
namespace AVX2 {
void group_norm_forward_impl(const GroupNormArgs& a);  // group_norm_avx2.cpp
}  // namespace AVX2
namespace AVX512 {
void group_norm_forward_impl(const GroupNormArgs& a);  // group_norm_avx512.cpp
}  // namespace AVX512
#endif

Isa cpu_isa() {
#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
  static const Isa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kDefault;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

void group_norm_forward(const GroupNormArgs& args) {
#ifdef DIFFKERN_CPU_HAS_X86_KERNELS
  switch (cpu_isa()) {
    case Isa::kAvx512: AVX512::group_norm_forward_impl(args); return;
    case Isa::kAvx2: AVX2::group_norm_forward_impl(args); return;
    default: break;
  }
#endif
  DEFAULT::group_norm_forward_impl(args);
}

const char* group_norm_capability() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace diffkern
