// CPU GroupNorm (+ scale-shift) (+ SiLU / GELU) forward, written once and compiled once per instruction
// set, like ATen/native/cpu kernels: the including TU defines CPU_CAPABILITY (DEFAULT, AVX2 or
// AVX512, and CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 for the latter) before including this file, and everything here lives in
// diffkern::cpu::CPU_CAPABILITY, so the copies never clash.
//
// Output stores: when y is large (kStreamMinBytes) the AVX2 / AVX512 builds write it with
// non-temporal (streaming) stores, after a scalar prologue that aligns each run to the vector size:
// this saves the read-for-ownership of every output line, which otherwise costs as much as the
// reads of x. Each thread issues an sfence after its last streaming store.
//
// Math, per (n, group g): mean, biased var over the group's C/G * S elements (float32 vector
// accumulation over L1-sized chunks, two passes per chunk, chunks merged with Chan's formula in
// double: no cancellation when |mean| >> std), rstd = 1 / sqrt(var + eps). Then per (n, c):
//   y = act((x - M) * A + B),  M = mean, A = rstd * w * (1 + scale), B = b * (1 + scale) + shift
// (one sub + one FMA per element; subtracting the mean first rather than folding it into B keeps
// full accuracy when |mean| * rstd is large).
//
// Layouts:
//   contiguous (stride_s == 1, S > 1): each group is one contiguous run of C/G * S elements. Groups
//     are processed whole by one thread (stats, then apply while the group is still in L2) when
//     there are enough groups to balance the threads; otherwise the groups are split in blocks:
//     parallel block stats, merge, parallel apply over the flattened tensor.
//   channels-last (stride_c == 1, and contiguous with S == 1): per-channel partial (count, mean,
//     M2) over blocks of spatial rows (one pass over x when it is large: each sub-block of rows is
//     shifted by the previous one's means), computed in parallel over (n, row block), merged per channel
//     and then per group with Chan's formula; then a parallel apply over rows, vectorised over c.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including group_norm_impl.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../group_norm_args.h"

namespace diffkern {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace gn_detail {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVF = fVec::size();  // floats per vector
constexpr int64_t kK = 2 * kVF;        // elements per step (one Vectorized<Half/BFloat16>)

inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return static_cast<float>(v); }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }

inline void load2(const float* p, fVec& a, fVec& b) {
  a = fVec::loadu(p);
  b = fVec::loadu(p + kVF);
}
inline void load2(const c10::Half* p, fVec& a, fVec& b) { at::vec::load_to_float<c10::Half>(p, a, b); }
inline void load2(const c10::BFloat16* p, fVec& a, fVec& b) {
  at::vec::load_to_float<c10::BFloat16>(p, a, b);
}
inline void store2(float* p, const fVec& a, const fVec& b) {
  a.store(p);
  b.store(p + kVF);
}
inline void store2(c10::Half* p, const fVec& a, const fVec& b) {
  at::vec::convert_from_float<c10::Half>(a, b).store(p);
}
inline void store2(c10::BFloat16* p, const fVec& a, const fVec& b) {
  at::vec::convert_from_float<c10::BFloat16>(a, b).store(p);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kHasStream = true;
#else
constexpr bool kHasStream = false;
#endif
// Streaming stores of one step (2 * kVF elements) to a sizeof(fVec)-aligned address.
#if defined(CPU_CAPABILITY_AVX512)
inline void store2_nt(float* p, const fVec& a, const fVec& b) {
  _mm512_stream_ps(p, a);
  _mm512_stream_ps(p + kVF, b);
}
inline void store2_nt(c10::Half* p, const fVec& a, const fVec& b) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<c10::Half>(a, b));
}
inline void store2_nt(c10::BFloat16* p, const fVec& a, const fVec& b) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<c10::BFloat16>(a, b));
}
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void store2_nt(float* p, const fVec& a, const fVec& b) {
  _mm256_stream_ps(p, a);
  _mm256_stream_ps(p + kVF, b);
}
inline void store2_nt(c10::Half* p, const fVec& a, const fVec& b) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<c10::Half>(a, b));
}
inline void store2_nt(c10::BFloat16* p, const fVec& a, const fVec& b) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<c10::BFloat16>(a, b));
}
inline void stream_fence() { _mm_sfence(); }
#else
template <typename T>
inline void store2_nt(T* p, const fVec& a, const fVec& b) { store2(p, a, b); }
inline void stream_fence() {}
#endif
template <bool kNT, typename T>
inline void store2x(T* p, const fVec& a, const fVec& b) {
  if constexpr (kNT) {
    store2_nt(p, a, b);
  } else {
    store2(p, a, b);
  }
}

// Outputs at least this large are written with streaming stores (where the ISA has them): they do
// not fit in the (per-core) L2, and a later reader finds them in DRAM / L3 either way.
constexpr int64_t kStreamMinBytes = int64_t(2) << 20;
template <typename T>
inline bool want_stream(const GroupNormArgs& a) {
  return kHasStream && a.N * a.C * a.S * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes &&
         reinterpret_cast<uintptr_t>(a.y) % sizeof(T) == 0;
}
// Elements to write before y + i is aligned for streaming stores (at most len).
template <typename T>
inline int64_t stream_peel(const T* y, int64_t len) {
  constexpr uintptr_t kAlign = sizeof(fVec);
  const uintptr_t mis = reinterpret_cast<uintptr_t>(y) % kAlign;
  return mis == 0 ? 0 : std::min<int64_t>(len, static_cast<int64_t>((kAlign - mis) / sizeof(T)));
}

inline void prefetch_l2(const char* p) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_prefetch(p, _MM_HINT_T1);
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

inline float hsum(const fVec& v) {
  alignas(64) float t[kVF];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < kVF; ++i) s += t[i];
  return s;
}

#if defined(CPU_CAPABILITY_AVX2)
// v / (1 + exp(-t)) for 8 floats (silu: t = v): exp by range reduction to 2^n * 2^f, |f| <= 1/2, with a
// degree-5 minimax polynomial (rel. error 1.9e-7), and 1 / (1 + e) by rcp + one Newton step (rel.
// error ~1e-7): about 16 cheap instructions, no division. Inputs are clamped so that e stays a
// normal float in [1.2e-38, 6e37], which makes silu(v) = v (v > 87) or -0 (v < -87) in the limits
// (and v / (1 + exp(-t)) = v (t > 87) or ~v * 1.7e-38 (t < -87) for the tanh-form GELU).
inline __m256 silu_avx2_t(__m256 v, __m256 targ) {
  __m256 t = _mm256_mul_ps(targ, _mm256_set1_ps(-1.44269504088896341f));  // -t * log2(e)
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-125.5f)), _mm256_set1_ps(125.5f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(0.001326472731307149f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009671512991189957f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05550733581185341f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022242426872253f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931470036506653f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e_bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_castsi256_ps(e_bits));  // 1 + exp(-t)
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));  // Newton: r * (2 - d * r)
  return _mm256_mul_ps(v, r);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The same for 16 floats, with AVX512's exponent tools: f = t - floor(t) in one vreduceps, 2^f by the
// degree-5 minimax polynomial above rewritten for [0, 1) (q(f) = sqrt(2) p(f - 1/2); rel. error
// 1.9e-7 in float), 2^floor(t) applied by vscalefps, then one division: on Zen 4 the divider runs
// beside the FMA pipes, which this loop saturates, so v / d beats rcp14 + Newton + multiply.
inline __m512 silu_avx512_t(__m512 v, __m512 targ) {
  __m512 t = _mm512_mul_ps(targ, _mm512_set1_ps(-1.44269504088896341f));  // -t * log2(e)
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-125.5f)), _mm512_set1_ps(125.5f));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // t - floor(t)
  __m512 p = _mm512_set1_ps(0.0018759156810119748f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.008987795561552048f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0558338463306427f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24014845490455627f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931539177894592f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999998807907104f));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_scalef_ps(p, t));  // 1 + exp(-t)
  return _mm512_div_ps(v, d);
}
#endif

// v / (1 + exp(-t)): silu is t = v, the tanh form of GELU is t = 2 sqrt(2 / pi) (v + 0.044715 v^3)
// (0.5 (1 + tanh(u)) = sigmoid(2u) exactly).
inline fVec v_sigmoid_t(const fVec& v, const fVec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return fVec(silu_avx512_t(v, t));
#elif defined(CPU_CAPABILITY_AVX2)
  return fVec(silu_avx2_t(v, t));
#else
  const fVec one(1.f);
  return v / (one + (fVec(0.f) - t).exp_u20());
#endif
}

constexpr float kGeluTanhK = 1.5957691216057308f;  // 2 * sqrt(2 / pi)
constexpr float kGeluTanhC = 0.044715f;

// kAct: 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh form), as GroupNormArgs::activation.
template <int kAct>
inline fVec act(const fVec& v) {
  if constexpr (kAct == 1) {
    return v_sigmoid_t(v, v);
  } else if constexpr (kAct == 2) {
    // 0.5 v (1 + erf(v / sqrt(2))): at::vec's erf, the one ATen's own GELU kernel uses
    return v * fVec(0.5f) * (fVec(1.f) + (v * fVec(0.70710678118654752f)).erf());
  } else if constexpr (kAct == 3) {
    const fVec t = fVec(kGeluTanhK) * (v + fVec(kGeluTanhC) * v * v * v);
    return v_sigmoid_t(v, t);
  } else {
    return v;
  }
}
template <int kAct>
inline float act_s(float v) {
  if constexpr (kAct == 1) {
    return v / (1.f + std::exp(-v));
  } else if constexpr (kAct == 2) {
    return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
  } else if constexpr (kAct == 3) {
    return v / (1.f + std::exp(-kGeluTanhK * (v + kGeluTanhC * v * v * v)));
  } else {
    return v;
  }
}

// (count, mean, M2) partial statistics, merged with Chan's formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
};
inline void merge(Moments& a, double nb, double mb, double m2b) {
  if (nb <= 0) return;
  if (a.n <= 0) {
    a.n = nb;
    a.mean = mb;
    a.m2 = m2b;
    return;
  }
  const double n = a.n + nb;
  const double d = mb - a.mean;
  a.mean += d * (nb / n);
  a.m2 += m2b + d * d * (a.n * nb / n);
  a.n = n;
}
inline void merge(Moments& a, const Moments& b) { merge(a, b.n, b.mean, b.m2); }

// Statistics of one contiguous run, merged into acc, over chunks of kChunk elements (L1 resident).
// Each chunk's float sums are taken around a shift K and merged in double (Chan's formula), which
// is exact-ish as long as |chunk mean - K| is not >> the spread: the first chunk of a run (acc
// empty) is read twice, the float sum giving K = its approximate mean; every later chunk is read
// once, shifted by the running mean of the chunks before it (a poor shift costs float rounding of
// order (chunk mean - K)^2 in that chunk's M2, small next to the run's M2, which contains that
// spread itself). One read per chunk matters on CPUs with little memory bandwidth per core: the
// stats then keep pace with the stream of x (benchmarks/results/NOTES-group_norm.md, entry 8).
template <typename T>
inline void chunk_moments(const T* q, int64_t L, float K, Moments& acc) {
  const int64_t Lv = L - L % (2 * kK);
  const fVec vK(K);
  fVec d0(0.f), d1(0.f), d2(0.f), d3(0.f), q0(0.f), q1(0.f), q2(0.f), q3(0.f);
  for (int64_t i = 0; i < Lv; i += 2 * kK) {
    fVec a, b, c, d;
    load2(q + i, a, b);
    load2(q + i + kK, c, d);
    a = a - vK;
    b = b - vK;
    c = c - vK;
    d = d - vK;
    d0 = d0 + a;
    d1 = d1 + b;
    d2 = d2 + c;
    d3 = d3 + d;
    q0 = at::vec::fmadd(a, a, q0);
    q1 = at::vec::fmadd(b, b, q1);
    q2 = at::vec::fmadd(c, c, q2);
    q3 = at::vec::fmadd(d, d, q3);
  }
  double D = hsum((d0 + d1) + (d2 + d3)), Q = hsum((q0 + q1) + (q2 + q3));
  for (int64_t i = Lv; i < L; ++i) {
    const double v = static_cast<double>(to_f(q[i]) - K);
    D += v;
    Q += v * v;
  }
  const double dl = static_cast<double>(L);
  merge(acc, dl, static_cast<double>(K) + D / dl, std::max(0.0, Q - D * D / dl));
}

template <typename T>
inline float chunk_sum(const T* q, int64_t L) {
  const int64_t Lv = L - L % (2 * kK);
  fVec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  for (int64_t i = 0; i < Lv; i += 2 * kK) {
    fVec a, b, c, d;
    load2(q + i, a, b);
    load2(q + i + kK, c, d);
    s0 = s0 + a;
    s1 = s1 + b;
    s2 = s2 + c;
    s3 = s3 + d;
  }
  float sum = hsum((s0 + s1) + (s2 + s3));
  for (int64_t i = Lv; i < L; ++i) sum += to_f(q[i]);
  return sum;
}

template <typename T>
inline void run_moments(const T* p, int64_t len, Moments& acc) {
  constexpr int64_t kChunk = 2048;  // multiple of 2 * kK
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t L = std::min(kChunk, len - c0);
    // a NaN/inf running mean would poison the shift of every later chunk; the result is NaN then
    // anyway, but keep the shift finite so that only the statistics that hold it turn NaN
    const bool fresh = acc.n <= 0 || !std::isfinite(acc.mean);
    const float K = fresh ? chunk_sum(p + c0, L) / static_cast<float>(L) : static_cast<float>(acc.mean);
    chunk_moments(p + c0, L, std::isfinite(K) ? K : 0.f, acc);
  }
}

// Per-group result: writes the float mean / rstd outputs, returns them in double.
inline void finish_group(const GroupNormArgs& a, int64_t ng, const Moments& m, double& mean, double& rstd) {
  // a NaN or +-inf in the group makes its statistics NaN (std::max(0, NaN) would give 0)
  const bool finite = std::isfinite(m.mean) && !std::isnan(m.m2);
  const double var = !finite ? std::nan("") : m.n > 0 ? std::max(0.0, m.m2 / m.n) : 0.0;
  mean = m.mean;
  rstd = 1.0 / std::sqrt(var + static_cast<double>(a.eps));
  a.mean[ng] = static_cast<float>(mean);
  a.rstd[ng] = static_cast<float>(rstd);
}

// Coefficients of y = act((x - M) * A + B) for channel c of sample n. M is the float nearest to the
// mean and x - M is exact (or nearly) in float; the remainder mean - M (below half an ulp of the
// mean, which matters when |mean| >> std) is folded into B in double.
template <typename T>
inline void coeffs(const GroupNormArgs& a, int64_t n, int64_t c, double mean, double rstd, float& M, float& A,
                   float& B) {
  const T* W = static_cast<const T*>(a.weight);
  const T* Bi = static_cast<const T*>(a.bias);
  const T* Sc = static_cast<const T*>(a.scale);
  const T* Sh = static_cast<const T*>(a.shift);
  const double w = W ? to_f(W[c]) : 1.0;
  const double b = Bi ? to_f(Bi[c]) : 0.0;
  const double s1 = Sc ? 1.0 + to_f(Sc[n * a.C + c]) : 1.0;
  const double sh = Sh ? to_f(Sh[n * a.C + c]) : 0.0;
  const double a_d = rstd * w * s1;
  A = static_cast<float>(a_d);
  if (std::abs(mean * a_d) <= 4.0) {
    // The mean is small next to the spread of y: fold it into B (y = x * A + B, one FMA); the
    // rounding of B then costs at most ~4 * 2^-24 absolute.
    M = 0.f;
    B = static_cast<float>(b * s1 + sh - mean * a_d);
  } else {
    M = static_cast<float>(mean);
    B = static_cast<float>(b * s1 + sh - (mean - static_cast<double>(M)) * a_d);
  }
}

// y[i] = act((x[i] - M) * A + B) over a contiguous run (kSub == false: M == 0, no subtraction;
// kNT: streaming stores, after a scalar prologue up to the first aligned y).
// pf (or null): where the thread reads next (the next group's matching element): prefetched into L2
// here, so that the DRAM reads of the next group's statistics overlap this compute-bound loop.
template <typename T, int kAct, bool kSub, bool kNT>
inline void apply_run_impl(const T* x, T* y, int64_t len, float M, float A, float B, const T* pf) {
  const fVec vM(M), vA(A), vB(B);
  auto sub = [&](const fVec& u) { return kSub ? u - vM : u; };
  int64_t i = 0;
  if constexpr (kNT) {
    for (const int64_t p = stream_peel(y, len); i < p; ++i)
      y[i] = from_f<T>(act_s<kAct>((to_f(x[i]) - M) * A + B));
  }
  for (; i + 2 * kK <= len; i += 2 * kK) {
    fVec u0, u1, u2, u3;
    if (pf) {
      for (int64_t o = 0; o < 2 * kK * int64_t(sizeof(T)); o += 64) prefetch_l2(reinterpret_cast<const char*>(pf + i) + o);
    }
    load2(x + i, u0, u1);
    load2(x + i + kK, u2, u3);
    u0 = at::vec::fmadd(sub(u0), vA, vB);
    u1 = at::vec::fmadd(sub(u1), vA, vB);
    u2 = at::vec::fmadd(sub(u2), vA, vB);
    u3 = at::vec::fmadd(sub(u3), vA, vB);
    store2x<kNT>(y + i, act<kAct>(u0), act<kAct>(u1));
    store2x<kNT>(y + i + kK, act<kAct>(u2), act<kAct>(u3));
  }
  for (; i + kK <= len; i += kK) {
    fVec u0, u1;
    load2(x + i, u0, u1);
    u0 = at::vec::fmadd(sub(u0), vA, vB);
    u1 = at::vec::fmadd(sub(u1), vA, vB);
    store2x<kNT>(y + i, act<kAct>(u0), act<kAct>(u1));
  }
  for (; i < len; ++i) y[i] = from_f<T>(act_s<kAct>((to_f(x[i]) - M) * A + B));
}

template <typename T, int kAct>
inline void apply_run(const T* x, T* y, int64_t len, float M, float A, float B, bool stream,
                      const T* pf = nullptr) {
  if (stream) {
    if (M == 0.f) {
      apply_run_impl<T, kAct, false, kHasStream>(x, y, len, M, A, B, pf);
    } else {
      apply_run_impl<T, kAct, true, kHasStream>(x, y, len, M, A, B, pf);
    }
  } else if (M == 0.f) {
    apply_run_impl<T, kAct, false, false>(x, y, len, M, A, B, pf);
  } else {
    apply_run_impl<T, kAct, true, false>(x, y, len, M, A, B, pf);
  }
}

// One channels-last row: y[c] = act((x[c] - M[c]) * A[c] + B[c]), c in [0, C).
template <typename T, int kAct, bool kNT>
inline void apply_row_cl_impl(const T* x, T* y, int64_t C, const float* M, const float* A, const float* B) {
  int64_t c = 0;
  if constexpr (kNT) {
    for (const int64_t p = stream_peel(y, C); c < p; ++c)
      y[c] = from_f<T>(act_s<kAct>((to_f(x[c]) - M[c]) * A[c] + B[c]));
  }
  for (; c + kK <= C; c += kK) {
    fVec u0, u1;
    load2(x + c, u0, u1);
    u0 = at::vec::fmadd(u0 - fVec::loadu(M + c), fVec::loadu(A + c), fVec::loadu(B + c));
    u1 = at::vec::fmadd(u1 - fVec::loadu(M + c + kVF), fVec::loadu(A + c + kVF), fVec::loadu(B + c + kVF));
    store2x<kNT>(y + c, act<kAct>(u0), act<kAct>(u1));
  }
  for (; c < C; ++c) y[c] = from_f<T>(act_s<kAct>((to_f(x[c]) - M[c]) * A[c] + B[c]));
}

// Contiguous layout, one thread per whole group: stats then apply while the group is in cache.
template <typename T, int kAct>
void contiguous_fused(const GroupNormArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  T* Y = static_cast<T*>(a.y);
  const int64_t C = a.C, G = a.G, S = a.S, Cg = C / G, D = Cg * S;
  const bool stream = want_stream<T>(a);
  at::parallel_for(0, a.N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      Moments m;
      run_moments(X + ng * D, D, m);
      double mean, rstd;
      finish_group(a, ng, m, mean, rstd);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        float M, A, B;
        coeffs<T>(a, n, c, mean, rstd, M, A, B);
        const int64_t off = (n * C + c) * S;
        // large x: pull the thread's next group into L2 while this one is written
        const T* pf = (stream && ng + 1 < end) ? X + off + D : nullptr;
        apply_run<T, kAct>(X + off, Y + off, S, M, A, B, stream, pf);
      }
    }
    if (stream) stream_fence();
  });
}

// Contiguous layout, groups split in blocks (few or very large groups).
template <typename T, int kAct>
void contiguous_split(const GroupNormArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  T* Y = static_cast<T*>(a.y);
  const int64_t N = a.N, C = a.C, G = a.G, S = a.S, Cg = C / G, D = Cg * S, NG = N * G;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  constexpr int64_t kMinBlock = 8192;
  int64_t nb = std::max<int64_t>(1, (8 * nt + NG - 1) / NG);           // blocks per group wanted
  nb = std::min<int64_t>(nb, std::max<int64_t>(1, D / kMinBlock));      // but not tiny blocks
  nb = std::max<int64_t>(nb, (D + (1 << 20) - 1) >> 20);                // and not huge ones
  int64_t bs = (D + nb - 1) / nb;
  bs = (bs + kK - 1) / kK * kK;
  nb = (D + bs - 1) / bs;
  std::vector<Moments> part(NG * nb);
  at::parallel_for(0, NG * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ng = t / nb, k = t % nb;
      const int64_t s0 = k * bs, len = std::min(bs, D - s0);
      run_moments(X + ng * D + s0, len, part[t]);
    }
  });
  std::vector<float> Mv(N * C), Av(N * C), Bv(N * C);
  for (int64_t ng = 0; ng < NG; ++ng) {
    Moments m;
    for (int64_t k = 0; k < nb; ++k) merge(m, part[ng * nb + k]);
    double mean, rstd;
    finish_group(a, ng, m, mean, rstd);
    const int64_t n = ng / G, g = ng % G;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
      coeffs<T>(a, n, c, mean, rstd, Mv[n * C + c], Av[n * C + c], Bv[n * C + c]);
  }
  const int64_t total = N * C * S;
  const bool stream = want_stream<T>(a);
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / S, s = i % S;
      const int64_t len = std::min(S - s, end - i);
      apply_run<T, kAct>(X + i, Y + i, len, Mv[row], Av[row], Bv[row], stream);
      i += len;
    }
    if (stream) stream_fence();
  });
}

// Channels-last statistics of columns [c, c + NS * kK) over R rows of stride C, register-blocked
// (NS * 2 vectors of accumulators, one pass over the rows): s1[c..] = column sums; then, with the
// column means m = s1, s2[c..] = sum(x - m), s3[c..] = sum((x - m)^2).
template <int NS, typename T>
inline void cl_col_sums(const T* base, int64_t C, int64_t R, int64_t c, float* s1) {
  fVec acc[2 * NS];
  for (int j = 0; j < 2 * NS; ++j) acc[j] = fVec(0.f);
  for (int64_t r = 0; r < R; ++r) {
    const T* row = base + r * C + c;
    for (int j = 0; j < NS; ++j) {
      fVec u0, u1;
      load2(row + j * kK, u0, u1);
      acc[2 * j] = acc[2 * j] + u0;
      acc[2 * j + 1] = acc[2 * j + 1] + u1;
    }
  }
  for (int j = 0; j < 2 * NS; ++j) acc[j].store(s1 + c + j * kVF);
}
template <int NS, bool kPf, typename T>
inline void cl_col_devs(const T* base, int64_t C, int64_t R, int64_t c, const float* s1, float* s2, float* s3) {
  fVec m[2 * NS], d[2 * NS], q[2 * NS];
  for (int j = 0; j < 2 * NS; ++j) {
    m[j] = fVec::loadu(s1 + c + j * kVF);
    d[j] = fVec(0.f);
    q[j] = fVec(0.f);
  }
  for (int64_t r = 0; r < R; ++r) {
    const T* row = base + r * C + c;
    // x is read once, from memory (or L3), in a strided pattern: fetch 8 rows ahead (kPf: x
    // is large, so not already in the core's caches).
    if constexpr (kPf) {
      for (int64_t b = 0; b < NS * kK * int64_t(sizeof(T)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row + 8 * C) + b, 0, 3);
    }
    for (int j = 0; j < NS; ++j) {
      fVec u0, u1;
      load2(row + j * kK, u0, u1);
      u0 = u0 - m[2 * j];
      u1 = u1 - m[2 * j + 1];
      d[2 * j] = d[2 * j] + u0;
      d[2 * j + 1] = d[2 * j + 1] + u1;
      q[2 * j] = at::vec::fmadd(u0, u0, q[2 * j]);
      q[2 * j + 1] = at::vec::fmadd(u1, u1, q[2 * j + 1]);
    }
  }
  for (int j = 0; j < 2 * NS; ++j) {
    d[j].store(s2 + c + j * kVF);
    q[j].store(s3 + c + j * kVF);
  }
}

// Channels-last layout (x[n, s, c]), also used for contiguous x with S == 1 (same addresses).
template <typename T, int kAct>
void channels_last(const GroupNormArgs& a) {
  const T* X = static_cast<const T*>(a.x);
  T* Y = static_cast<T*>(a.y);
  const int64_t N = a.N, C = a.C, G = a.G, S = a.S, Cg = C / G;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  // Row blocks per sample: enough tasks for the threads, but blocks of >= ~16K elements.
  int64_t nblk = std::max<int64_t>(1, (4 * nt + N - 1) / N);
  nblk = std::min<int64_t>(nblk, std::max<int64_t>(1, S * C / 16384));
  nblk = std::min<int64_t>(nblk, S);
  const int64_t rpb = (S + nblk - 1) / nblk;
  nblk = (S + rpb - 1) / rpb;
  std::vector<Moments> part(N * nblk * C);
  const bool big = N * S * C * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  at::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(3 * C);
    float* s1 = buf.data();       // sums, then approximate means
    float* s2 = s1 + C;           // sum(x - mf)
    float* s3 = s2 + C;           // sum((x - mf)^2)
    // Rows per sub-block: L2-resident (it is read twice, column block by column block, with the
    // accumulators in registers), and at most 64 so that each channel's float accumulators sum few
    // terms (they are merged in double with Chan's formula after every sub-block).
    const int64_t sub = std::min<int64_t>(64, std::max<int64_t>(1, 32768 / C));
    const int64_t Cv = C - C % kK;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / nblk, k = t % nblk;
      const int64_t r0 = k * rpb, r1 = std::min(S, r0 + rpb);
      Moments* P = part.data() + t * C;
      for (int64_t rs = r0; rs < r1; rs += sub) {
        const int64_t re = std::min(r1, rs + sub);
        const float L = static_cast<float>(re - rs);
        const T* base = X + (n * S + rs) * C;
        const int64_t R = re - rs;
        int64_t c = 0;
        if (rs == r0 || !big) {
          // First sub-block of the task (or x is small, cache resident: two passes are cheap): a
          // pass of column sums, and the column means are the shift. For large x, later
          // sub-blocks are shifted by the previous sub-block's means instead (set below), which
          // saves this pass: x is read once. A poor shift (the channel's mean jumps between
          // neighbouring sub-blocks) costs float rounding of order jump^2 in that sub-block's
          // M2, which is small next to the group's M2: the jump itself adds ~L * jump^2 / 2.
          for (; c + 2 * kK <= C; c += 2 * kK) cl_col_sums<2>(base, C, R, c, s1);
          for (; c < Cv; c += kK) cl_col_sums<1>(base, C, R, c, s1);
          for (; c < C; ++c) {
            float sum = 0.f;
            for (int64_t r = 0; r < R; ++r) sum += to_f(base[r * C + c]);
            s1[c] = sum;
          }
          for (c = 0; c < C; ++c) s1[c] /= L;
        }
        if (big) {
          for (c = 0; c + 4 * kK <= C; c += 4 * kK) cl_col_devs<4, true>(base, C, R, c, s1, s2, s3);
          for (; c + 2 * kK <= C; c += 2 * kK) cl_col_devs<2, true>(base, C, R, c, s1, s2, s3);
          for (; c < Cv; c += kK) cl_col_devs<1, true>(base, C, R, c, s1, s2, s3);
        } else {
          for (c = 0; c + 2 * kK <= C; c += 2 * kK) cl_col_devs<2, false>(base, C, R, c, s1, s2, s3);
          for (; c < Cv; c += kK) cl_col_devs<1, false>(base, C, R, c, s1, s2, s3);
        }
        for (; c < C; ++c) {
          float t2 = 0.f, t3 = 0.f;
          for (int64_t r = 0; r < R; ++r) {
            const float d = to_f(base[r * C + c]) - s1[c];
            t2 += d;
            t3 += d * d;
          }
          s2[c] = t2;
          s3[c] = t3;
        }
        const double dl = static_cast<double>(L);
        for (int64_t c = 0; c < C; ++c) {
          const double dd = s2[c];
          const double mb = static_cast<double>(s1[c]) + dd / dl;
          merge(P[c], dl, mb, std::max(0.0, s3[c] - dd * dd / dl));
          s1[c] = static_cast<float>(mb);
        }
      }
    }
  });
  std::vector<float> Mv(N * C), Av(N * C), Bv(N * C);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        Moments m;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          Moments mc;
          for (int64_t k = 0; k < nblk; ++k) merge(mc, part[(n * nblk + k) * C + c]);
          merge(m, mc);
        }
        double mean, rstd;
        finish_group(a, n * G + g, m, mean, rstd);
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
          coeffs<T>(a, n, c, mean, rstd, Mv[n * C + c], Av[n * C + c], Bv[n * C + c]);
      }
    }
  });
  const bool stream = want_stream<T>(a);
  at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / S;
      const float *Mr = Mv.data() + n * C, *Ar = Av.data() + n * C, *Br = Bv.data() + n * C;
      if (stream) {
        apply_row_cl_impl<T, kAct, kHasStream>(X + r * C, Y + r * C, C, Mr, Ar, Br);
      } else {
        apply_row_cl_impl<T, kAct, false>(X + r * C, Y + r * C, C, Mr, Ar, Br);
      }
    }
    if (stream) stream_fence();
  });
}

template <typename T, int kAct>
void run(const GroupNormArgs& a) {
  if (a.channels_last || a.S == 1) {
    channels_last<T, kAct>(a);
    return;
  }
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t NG = a.N * a.G;
  const int64_t group_bytes = a.C / a.G * a.S * static_cast<int64_t>(sizeof(T));
  const bool balanced = NG % nt == 0 || NG >= 8 * nt;
  if (nt == 1 || (balanced && group_bytes <= (int64_t(2) << 20))) {
    contiguous_fused<T, kAct>(a);
  } else {
    contiguous_split<T, kAct>(a);
  }
}

template <typename T>
void run_dtype(const GroupNormArgs& a) {
  switch (a.activation) {
    case 1: run<T, 1>(a); break;
    case 2: run<T, 2>(a); break;
    case 3: run<T, 3>(a); break;
    default: run<T, 0>(a); break;
  }
}

}  // namespace gn_detail

void group_norm_forward_impl(const GroupNormArgs& a) {
  // string-only messages: see the note on iostream formatting at the top of csrc/bindings.cpp
  TORCH_CHECK(a.N >= 1 && a.C >= 1 && a.S >= 1 && a.G >= 1 && a.C % a.G == 0, "group_norm (cpu): bad sizes");
  TORCH_CHECK(a.stride_n == a.C * a.S, "group_norm (cpu): unexpected stride_n");
  if (a.channels_last) {
    TORCH_CHECK(a.stride_c == 1 && a.stride_s == a.C, "group_norm (cpu): unexpected channels_last strides");
  } else {
    TORCH_CHECK(a.stride_c == a.S && a.stride_s == 1, "group_norm (cpu): unexpected contiguous strides");
  }
  switch (a.dtype) {
    case DType::kFloat32: gn_detail::run_dtype<float>(a); break;
    case DType::kFloat16: gn_detail::run_dtype<c10::Half>(a); break;
    case DType::kBFloat16: gn_detail::run_dtype<c10::BFloat16>(a); break;
    default: TORCH_CHECK(false, "group_norm (cpu): unsupported dtype");
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace diffkern
