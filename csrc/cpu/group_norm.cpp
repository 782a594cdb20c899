// CPU group_norm forward: the portable (DEFAULT) build of group_norm_impl.h, plus the run-time
// dispatch to the AVX2 build (group_norm_avx2.cpp) on x86-64 CPUs with avx2 + fma.
#include "group_norm.h"

#define CPU_CAPABILITY DEFAULT
#include "group_norm_impl.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DIFFKERN_CPU_HAS_AVX2_KERNEL 1
#endif

namespace diffkern {
namespace cpu {

#ifdef DIFFKERN_CPU_HAS_AVX2_KERNEL
namespace AVX2 {
void group_norm_forward_impl(const GroupNormArgs& a);  // group_norm_avx2.cpp
}  // namespace AVX2
#endif

namespace {

bool cpu_has_avx2() {
#ifdef DIFFKERN_CPU_HAS_AVX2_KERNEL
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace

void group_norm_forward(const GroupNormArgs& args) {
#ifdef DIFFKERN_CPU_HAS_AVX2_KERNEL
  if (cpu_has_avx2()) {
    AVX2::group_norm_forward_impl(args);
    return;
  }
#endif
  DEFAULT::group_norm_forward_impl(args);
}

const char* group_norm_capability() { return cpu_has_avx2() ? "avx2" : "default"; }

}  // namespace cpu
}  // namespace diffkern
