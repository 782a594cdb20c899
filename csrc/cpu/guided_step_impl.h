// CPU guided_step kernel body, compiled once per instruction set like ATen/native/cpu kernels: the
// including file defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512; see group_norm_isa.h) and
// everything lives in diffkern::cpu::CPU_CAPABILITY. Work items are (sample, chunk of kChunk elements),
// so each item's coefficients are scalars; the math is float32 whatever the storage dtype. The update
// is memory-bound (the wider ISAs matter for the in-kernel Philox noise: its rounds and log / cos).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including guided_step_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "../guided_step_args.h"
#include "../philox.h"

namespace diffkern {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace gs_detail {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 4096;

template <typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    float tmp[Vec::size()];
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp, n);
  }
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
    float tmp[Vec::size()];
    v.store(tmp, n);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// Vec::size() normals of csrc/philox.h's stream at indices base, base + 1, ...: the Philox rounds run
// lane-wise over arrays (the compiler vectorises them: 32x32->64-bit multiplies), Box-Muller on Vec
// (Sleef's log / cos in the AVX2 / AVX512 builds). Lanes past the block's end are computed and unused.
inline Vec seeded_normals(uint64_t seed, uint64_t base) {
  constexpr int kLanes = Vec::size();
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    c0[j] = static_cast<uint32_t>(base + j);
    c1[j] = static_cast<uint32_t>((base + j) >> 32);
    c2[j] = c3[j] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[j];
      const uint64_t p2 = static_cast<uint64_t>(kPhiloxM1) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p2);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  alignas(64) float u1[kLanes], u2[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    u1[j] = static_cast<float>((c0[j] >> 8) + 1u) * kPhiloxUnit;
    u2[j] = static_cast<float>(c1[j] >> 8) * kPhiloxUnit;
  }
  const Vec r = (Vec(-2.0f) * Vec::loadu(u1).log()).sqrt();
  return r * (Vec(kTwoPi) * Vec::loadu(u2)).cos();
}

template <typename T>
void run(const GuidedStepArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  const T* M = static_cast<const T*>(a.m);
  const T* U = static_cast<const T*>(a.u);
  const T* Z = static_cast<const T*>(a.noise);
  T* P = static_cast<T*>(a.prev);
  T* X0 = static_cast<T*>(a.x0);
  const int64_t chunks = (a.N + kChunk - 1) / kChunk;
  const bool stats = a.abs_out != nullptr;
  at::parallel_for(0, a.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t lo = (item % chunks) * kChunk, hi = std::min(lo + kChunk, a.N);
      const float* c = a.coeffs + b * a.K;
      const Vec sa(c[0]), s1m(c[1]), c_x0(c[2]), c_xt(c[3]), c_eps(c[4]), sigma(c[5]);
      const bool use_eps = c[4] != 0.0f;
      const Vec min_log(a.learned ? c[6] : 0.0f), max_log(a.learned ? c[7] : 0.0f);
      const Vec g(a.guidance_scale), one(1.0f), half(0.5f);
      const Vec thr(a.clip == 2 && !stats ? a.thresholds[b] : 1.0f);
      const Vec lim(a.clip == 2 ? 1.0f : a.clip_range);
      const T* xb = X + b * a.N;
      const T* mb = M + b * a.M_stride;
      const T* ub = U ? U + b * a.M_stride : nullptr;
      for (int64_t i = lo; i < hi; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), hi - i);
        const Vec x = load(xb + i, n);
        Vec pred = load(mb + i, n);
        if (ub) {
          const Vec un = load(ub + i, n);
          pred = un + g * (pred - un);
        }
        Vec x0 = a.pred == 0 ? (x - s1m * pred) / sa : a.pred == 1 ? pred : sa * x - s1m * pred;
        const Vec x0_raw = x0;
        if (stats) {
          x0.abs().store(a.abs_out + b * a.N + i, n);
          continue;
        }
        if (a.clip == 1) {
          x0 = at::vec::clamp(x0, -lim, lim);
        } else if (a.clip == 2) {
          x0 = at::vec::clamp(x0, -thr, thr) / thr;
        }
        Vec out = c_x0 * x0 + c_xt * x;
        if (use_eps) {
          const bool from_x0 = a.pred == 1 || (a.clip != 0 && a.eps_from_clipped);
          Vec eps = from_x0 ? (x - sa * (a.eps_from_clipped ? x0 : x0_raw)) / s1m
                    : a.pred == 0 ? pred : sa * pred + s1m * x;
          out = out + c_eps * eps;
        }
        if (Z || a.seeded) {
          Vec std = sigma;
          if (a.learned) {
            const Vec frac = (load(mb + a.N + i, n) + one) * half;
            std = (half * (frac * max_log + (one - frac) * min_log)).exp();
          }
          const Vec z = a.seeded ? seeded_normals(a.seed, a.offset + static_cast<uint64_t>(b * a.N + i))
                                 : load(Z + b * a.N + i, n);
          out = out + std * z;
        }
        store(P + b * a.N + i, out, n);
        store(X0 + b * a.N + i, x0, n);
      }
    }
  });
}

}  // namespace gs_detail

void guided_step_forward_impl(const GuidedStepArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: gs_detail::run<float>(a); break;
    case DType::kFloat16: gs_detail::run<c10::Half>(a); break;
    case DType::kBFloat16: gs_detail::run<c10::BFloat16>(a); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace diffkern
