// The AVX512 (F, BW, VL, DQ, + FMA, F16C) build of sampler_update_impl.h, selected at run time by
// sampler_update.cpp. See group_norm_isa.h for how the instruction set is enabled without -m flags.
#define CPU_CAPABILITY AVX512
#define DIFFKERN_SLEEF_AVX 1
#define DIFFKERN_SLEEF_AVX512 1
#include "group_norm_isa.h"
// general headers before the pragma (see group_norm_isa.h): their inline code stays baseline
#include "../sampler_update_args.h"

#ifdef DIFFKERN_ISA_SUPPORTED
DIFFKERN_ISA_PUSH("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "sampler_update_impl.h"

DIFFKERN_ISA_POP()
#endif  // DIFFKERN_ISA_SUPPORTED
