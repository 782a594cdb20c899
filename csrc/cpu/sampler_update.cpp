// CPU sampler_update: one pass over (sample, chunk of kChunk elements) work items, so each item's
// coefficients are scalars. Each element is read once from every input and written once to every
// output; the inner loops are plain float loops over a small stack tile that the compiler vectorises
// (the op is memory-bound: a few flops per byte), with float32 math whatever the storage dtype.
#include "sampler_update.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace diffkern {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;
constexpr int64_t kTile = 256;  // stack tile: converted float inputs of one row segment

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// acc[i] += c * h[i] for a history tensor of storage type T (c != 0 checked by the caller)
template <typename T>
inline void axpy(float* acc, const T* h, float c, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += c * h[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += c * static_cast<float>(h[i]);
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
    alignas(64) float x[kTile], d[kTile], o[kTile], q[kTile], tmp[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t lo = (item % chunks) * kChunk, hi = std::min(lo + kChunk, a.N);
      const float* c = a.coeffs + b * a.K;
      const float cx = c[0], cp = c[1], ca = c[2], cb = c[3], std_ = c[4 + H];
      const float* cj = c + 4;
      const float* dj = c + 7 + H;  // a2 = c[5 + H], b2 = c[6 + H]
      const float a2 = with_aux ? c[5 + H] : 0.0f, b2 = with_aux ? c[6 + H] : 0.0f;
      const float g = a.guidance_scale, lim = a.clip_range;
      const float thr = (a.clip == 2 && !stats) ? a.thresholds[b] : 1.0f;
      const int64_t row = b * a.N;
      for (int64_t i0 = lo; i0 < hi; i0 += kTile) {
        const int64_t n = std::min(kTile, hi - i0);
        const int64_t off = row + i0;
        to_float(X + off, x, n);
        to_float(M + off, d, n);  // d holds pred until converted
        if (U) {
          to_float(U + off, tmp, n);
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) d[i] = tmp[i] + g * (d[i] - tmp[i]);
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) d[i] = cx * x[i] + cp * d[i];
        if (stats) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) a.abs_out[off + i] = std::fabs(d[i]);
          continue;
        }
        if (a.clip == 1) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) d[i] = std::min(std::max(d[i], -lim), lim);
        } else if (a.clip == 2) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) d[i] = std::min(std::max(d[i], -thr), thr) / thr;
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = ca * x[i] + cb * d[i];
        if (with_aux) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) q[i] = a2 * x[i] + b2 * d[i];
        }
        for (int j = 0; j < H; ++j) {  // a zero coefficient drops the term (the slot may hold inf)
          const T* hj = static_cast<const T*>(a.h[j]) + off;
          if (cj[j] != 0.0f) axpy(o, hj, cj[j], n);
          if (with_aux && dj[j] != 0.0f) axpy(q, hj, dj[j], n);
        }
        if (Z && std_ != 0.0f) axpy(o, Z + off, std_, n);
        from_float(o, static_cast<T*>(a.out) + off, n);
        from_float(d, static_cast<T*>(a.d) + off, n);
        if (with_aux) from_float(q, static_cast<T*>(a.aux) + off, n);
      }
    }
  });
}

}  // namespace

void sampler_update_forward(const SamplerUpdateArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: run<float>(a); break;
    case DType::kFloat16: run<c10::Half>(a); break;
    case DType::kBFloat16: run<c10::BFloat16>(a); break;
  }
}

}  // namespace cpu
}  // namespace diffkern
