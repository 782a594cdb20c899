// The instruction set the CPU kernels with per-ISA builds (group_norm, guided_step) pick at run time.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DIFFKERN_CPU_HAS_X86_KERNELS 1
#endif

namespace diffkern {
namespace cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

// AVX512 (F, BW, VL, DQ + FMA, F16C), else AVX2 (+FMA, F16C), else the portable build; detected once.
Isa cpu_isa();

}  // namespace cpu
}  // namespace diffkern
