// Shared prologue of the per-instruction-set builds of group_norm_impl.h (group_norm_avx2.cpp,
// group_norm_avx512.cpp). setup.py compiles every file with the same flags (no -m options), so the
// instruction set is enabled with a target pragma. Every general header (c10, ATen, std) is included
// HERE, before the pragma and before CPU_CAPABILITY_<ISA> is defined, so that their inline functions
// (c10::Half conversions, std:: templates, ...) are compiled for the baseline ISA; only at::vec (in
// the inline namespace at::vec::<ISA>) and our kernel (diffkern::cpu::<ISA>) are compiled for the
// ISA. A build file reads:
//
//   #define CPU_CAPABILITY AVX2
//   #define DIFFKERN_SLEEF_AVX 1            // and/or DIFFKERN_SLEEF_AVX512 1
//   #include "group_norm_isa.h"
//   DIFFKERN_ISA_PUSH("avx2,fma,f16c")
//   #define CPU_CAPABILITY_AVX2
//   #include <ATen/cpu/vec/functional.h>
//   #include <ATen/cpu/vec/vec.h>
//   #include "group_norm_impl.h"
//   DIFFKERN_ISA_POP()
//
// Only for x86-64 with GCC / Clang (the build files check DIFFKERN_ISA_SUPPORTED).
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DIFFKERN_ISA_SUPPORTED 1

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../group_norm_args.h"

// sleef.h (included by at::vec) declares its 256-bit functions only #ifdef __AVX__ and its 512-bit
// ones only #ifdef __AVX512F__, which the target pragma does not define. It holds declarations and
// typedefs only (no code), so include it here, before the pragma, with those macros defined for the
// duration of the include (after the compiler's intrinsic headers, which must see the real macros
// to set up their own targets).
#include <immintrin.h>
#include <x86intrin.h>
#if defined(DIFFKERN_SLEEF_AVX) && !defined(__AVX__)
#define __AVX__ 1
#define DIFFKERN_DEFINED_AVX_MACRO
#endif
#if defined(DIFFKERN_SLEEF_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define DIFFKERN_DEFINED_AVX512F_MACRO
#endif
#include <sleef.h>
#ifdef DIFFKERN_DEFINED_AVX_MACRO
#undef __AVX__
#undef DIFFKERN_DEFINED_AVX_MACRO
#endif
#ifdef DIFFKERN_DEFINED_AVX512F_MACRO
#undef __AVX512F__
#undef DIFFKERN_DEFINED_AVX512F_MACRO
#endif

// DIFFKERN_ISA_PUSH("target,list") / DIFFKERN_ISA_POP(): enable an instruction set for the functions
// defined in between (the argument is macro-expanded, then stringised into the pragma).
#define DIFFKERN_PRAGMA_(x) _Pragma(#x)
#if defined(__clang__)
#define DIFFKERN_ISA_PUSH(isa) \
  DIFFKERN_PRAGMA_(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define DIFFKERN_ISA_POP() DIFFKERN_PRAGMA_(clang attribute pop)
#else
#define DIFFKERN_ISA_PUSH(isa) DIFFKERN_PRAGMA_(GCC push_options) DIFFKERN_PRAGMA_(GCC target(isa))
#define DIFFKERN_ISA_POP() DIFFKERN_PRAGMA_(GCC pop_options)
#endif

#endif  // x86-64 with GCC / Clang
