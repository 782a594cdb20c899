// The AVX2 (+FMA, F16C) build of group_norm_impl.h, selected at run time by group_norm.cpp.
// setup.py compiles every file with the same flags (no -mavx2), so the instruction set is enabled
// here with a target pragma. Every general header (c10, ATen, std) is included BEFORE the pragma and
// before CPU_CAPABILITY_AVX2 is defined, so that their inline functions (c10::Half conversions,
// std:: templates, ...) are compiled for the baseline ISA; only at::vec (which lives in the inline
// namespace at::vec::AVX2) and our kernel (diffkern::cpu::AVX2) are compiled for AVX2.
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))

#define CPU_CAPABILITY AVX2

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

// sleef.h (included by at::vec) declares its 256-bit functions only #ifdef __AVX__, which the target
// pragma below does not define. It holds declarations and typedefs only (no code), so include it
// here, before the pragma, with __AVX__ defined for the duration of the include (after the
// compiler's intrinsic headers, which must see the real __AVX__ to set up their own targets).
#include <immintrin.h>
#include <x86intrin.h>
#if !defined(__AVX__)
#define __AVX__ 1
#define DIFFKERN_DEFINED_AVX_MACRO
#endif
#include <sleef.h>
#ifdef DIFFKERN_DEFINED_AVX_MACRO
#undef __AVX__
#undef DIFFKERN_DEFINED_AVX_MACRO
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define CPU_CAPABILITY_AVX2
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "group_norm_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86-64 with GCC / Clang
