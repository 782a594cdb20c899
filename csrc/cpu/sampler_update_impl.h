// CPU sampler_update kernel body, compiled once per instruction set like guided_step_impl.h: the
// including file defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512; see group_norm_isa.h) and
// everything lives in diffkern::cpu::CPU_CAPABILITY. Work items are (sample, chunk of kChunk elements),
// so each item's coefficients are scalars; one pass reads every input once and writes every output
// once, float32 math whatever the storage dtype (the op is memory-bound: a few flops per byte).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including sampler_update_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../sampler_update_args.h"

namespace diffkern {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace su_detail {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 4096;

template <typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    float tmp[Vec::size()];
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp, n);
  }
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == Vec::size()) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  } else {
    float tmp[Vec::size()];
    v.store(tmp, n);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

template <typename T>
void run(const SamplerUpdateArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  const T* M = static_cast<const T*>(a.m);
  const T* U = static_cast<const T*>(a.u);
  const T* Z = static_cast<const T*>(a.noise);
  const int H = a.H;
  const int64_t chunks = (a.N + kChunk - 1) / kChunk;
  const bool stats = a.abs_out != nullptr;
  const bool with_aux = a.aux != nullptr;
  at::parallel_for(0, a.B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t lo = (item % chunks) * kChunk, hi = std::min(lo + kChunk, a.N);
      const float* c = a.coeffs + b * a.K;
      const Vec cx(c[0]), cp(c[1]), ca(c[2]), cb(c[3]), g(a.guidance_scale);
      const float std_ = c[4 + H];
      const Vec a2(with_aux ? c[5 + H] : 0.0f), b2(with_aux ? c[6 + H] : 0.0f);
      const Vec lim(a.clip == 2 ? ((stats ? 1.0f : a.thresholds[b])) : a.clip_range);
      // only the history slots with a non-zero coefficient are read
      const T* hp[kSamplerMaxHistory];
      float hc[kSamplerMaxHistory], hd[kSamplerMaxHistory];
      int nh = 0;
      for (int j = 0; j < H; ++j) {
        const float cj = c[4 + j], dj = with_aux ? c[7 + H + j] : 0.0f;
        if (cj == 0.0f && dj == 0.0f) continue;
        hp[nh] = static_cast<const T*>(a.h[j]) + b * a.N;
        hc[nh] = cj;
        hd[nh] = dj;
        ++nh;
      }
      const T* xb = X + b * a.N;
      const T* mb = M + b * a.N;
      const T* ub = U ? U + b * a.N : nullptr;
      const T* zb = (Z && std_ != 0.0f) ? Z + b * a.N : nullptr;
      T* ob = static_cast<T*>(a.out) + b * a.N;
      T* db = static_cast<T*>(a.d) + b * a.N;
      T* qb = with_aux ? static_cast<T*>(a.aux) + b * a.N : nullptr;
      for (int64_t i = lo; i < hi; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), hi - i);
        const Vec x = load(xb + i, n);
        Vec pred = load(mb + i, n);
        if (ub) {
          const Vec un = load(ub + i, n);
          pred = un + g * (pred - un);
        }
        Vec d = cx * x + cp * pred;
        if (stats) {
          d.abs().store(a.abs_out + b * a.N + i, n);
          continue;
        }
        if (a.clip == 1) {
          d = at::vec::clamp(d, -lim, lim);
        } else if (a.clip == 2) {
          d = at::vec::clamp(d, -lim, lim) / lim;
        }
        Vec o = ca * x + cb * d;
        Vec q = a2 * x + b2 * d;
        for (int j = 0; j < nh; ++j) {
          const Vec h = load(hp[j] + i, n);
          if (hc[j] != 0.0f) o = o + Vec(hc[j]) * h;
          if (hd[j] != 0.0f) q = q + Vec(hd[j]) * h;
        }
        if (zb) o = o + Vec(std_) * load(zb + i, n);
        store(ob + i, o, n);
        store(db + i, d, n);
        if (qb) store(qb + i, q, n);
      }
    }
  });
}

}  // namespace su_detail

void sampler_update_forward_impl(const SamplerUpdateArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: su_detail::run<float>(a); break;
    case DType::kFloat16: su_detail::run<c10::Half>(a); break;
    case DType::kBFloat16: su_detail::run<c10::BFloat16>(a); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace diffkern
