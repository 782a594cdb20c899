// The AVX2 (+FMA, F16C) build of guided_step_impl.h, selected at run time by guided_step.cpp. See
// group_norm_isa.h for how the instruction set is enabled without -m flags.
#define CPU_CAPABILITY AVX2
#define DIFFKERN_SLEEF_AVX 1
#include "group_norm_isa.h"
// general headers before the pragma (see group_norm_isa.h): their inline code stays baseline
#include "../guided_step_args.h"
#include "../philox.h"

#ifdef DIFFKERN_ISA_SUPPORTED
DIFFKERN_ISA_PUSH("avx2,fma,f16c")

#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "guided_step_impl.h"

DIFFKERN_ISA_POP()
#endif  // DIFFKERN_ISA_SUPPORTED
