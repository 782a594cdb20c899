// CPU dynamic thresholding by radix selection (no sort).
//
// For non-negative floats the uint32 bit pattern is order-preserving, so the order statistics of
// |x| are those of the keys bits(|x|) = bits(x) & 0x7fffffff (NaNs sort above +inf). Per sample:
//  1. histogram of the top 11 key bits (bits 20..30; bit 31 is 0) over the sample, chunked and
//     parallel with one histogram per thread; NaNs counted on the way;
//  2. the buckets holding ranks lo = floor(p (n-1)) and hi = ceil(p (n-1)): when they differ, the
//     answers are max(bucket lo) and min(bucket hi), found in one more pass; else that bucket's
//     keys are gathered (for spread data a few percent of n) and refined the same way on bits
//     10..19 and 0..9, which leaves the exact keys;
//  3. s = lerp(v_lo, v_hi, p (n-1) - lo) in double, max(s, 1), min(s, max_value); then one
//     vectorised pass y = clamp(x, -s, s) / s.
// Samples run in parallel when there are enough of them (selection + apply in one task), else each
// sample's passes are parallel.
#include "dynamic_threshold.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace diffkern {
namespace cpu {
namespace {

constexpr int kTopShift = 20;     // top level: key >> 20 (11 bits, < 2048 since bit 31 is 0)
constexpr int kTopBins = 2048;
constexpr int kLowBits = 10;      // lower levels: bits 10..19, then 0..9
constexpr int kLowBins = 1 << kLowBits;
constexpr uint32_t kInfKey = 0x7f800000u;
constexpr int64_t kGrain = 32768;

inline uint32_t abs_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}
inline float key_value(uint32_t k) {
  float v;
  std::memcpy(&v, &k, sizeof(v));
  return v;
}
template <typename T>
inline uint32_t key_at(const T* x, int64_t i) { return abs_key(static_cast<float>(x[i])); }

// Runs fn(begin, end, slot) over [0, n): parallel chunks with one slot per thread, or serially.
template <typename F>
void for_chunks(int64_t n, bool parallel, const F& fn) {
  if (parallel) {
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { fn(b, e, at::get_thread_num()); });
  } else {
    fn(0, n, 0);
  }
}

// Digit holding rank r given a histogram; r becomes the rank within that digit.
template <typename Count>
int find_digit(const Count* hist, int bins, int64_t& r) {
  int64_t cum = 0;
  for (int d = 0; d < bins; ++d) {
    if (r < cum + static_cast<int64_t>(hist[d])) {
      r -= cum;
      return d;
    }
    cum += hist[d];
  }
  return bins - 1;  // unreachable for r < total
}

// keys all share bits 20..31; finds the keys of ranks rlo <= rhi among them.
void refine(std::vector<uint32_t>& keys, int64_t rlo, int64_t rhi, uint32_t& out_lo, uint32_t& out_hi) {
  for (int shift : {kLowBits, 0}) {
    std::array<int64_t, kLowBins> hist{};
    for (uint32_t k : keys) ++hist[(k >> shift) & (kLowBins - 1)];
    const int dlo = find_digit(hist.data(), kLowBins, rlo);
    const int dhi = find_digit(hist.data(), kLowBins, rhi);
    if (dlo != dhi) {  // hi - lo <= 1: lo is the largest of digit dlo, hi the smallest of dhi
      uint32_t mx = 0, mn = 0xffffffffu;
      for (uint32_t k : keys) {
        const int d = static_cast<int>((k >> shift) & (kLowBins - 1));
        if (d == dlo) mx = std::max(mx, k);
        if (d == dhi) mn = std::min(mn, k);
      }
      out_lo = mx;
      out_hi = mn;
      return;
    }
    size_t m = 0;
    for (uint32_t k : keys)
      if (static_cast<int>((k >> shift) & (kLowBins - 1)) == dlo) keys[m++] = k;
    keys.resize(m);
  }
  out_lo = out_hi = keys[0];  // every bit is now fixed: all remaining keys are equal
}

struct Picked {
  uint32_t lo = 0, hi = 0;
  bool nan = false;
};

template <typename T>
Picked select_sample(const T* x, int64_t n, int64_t rlo, int64_t rhi, bool parallel) {
  const int slots = parallel ? at::get_num_threads() : 1;
  std::vector<int64_t> hists(static_cast<size_t>(slots) * kTopBins, 0);
  std::vector<int64_t> nans(slots, 0);
  for_chunks(n, parallel, [&](int64_t b, int64_t e, int slot) {
    int64_t* h = hists.data() + static_cast<size_t>(slot) * kTopBins;
    int64_t nan = 0;
    for (int64_t i = b; i < e; ++i) {
      const uint32_t k = key_at(x, i);
      ++h[k >> kTopShift];
      nan += k > kInfKey;
    }
    nans[slot] += nan;
  });
  Picked p;
  for (int s = 0; s < slots; ++s) p.nan |= nans[s] > 0;
  if (p.nan) return p;
  for (int s = 1; s < slots; ++s)
    for (int d = 0; d < kTopBins; ++d) hists[d] += hists[static_cast<size_t>(s) * kTopBins + d];
  const uint32_t blo = static_cast<uint32_t>(find_digit(hists.data(), kTopBins, rlo));
  const uint32_t bhi = static_cast<uint32_t>(find_digit(hists.data(), kTopBins, rhi));

  if (blo != bhi) {
    std::vector<uint32_t> mx(slots, 0), mn(slots, 0xffffffffu);
    for_chunks(n, parallel, [&](int64_t b, int64_t e, int slot) {
      uint32_t a = mx[slot], c = mn[slot];
      for (int64_t i = b; i < e; ++i) {
        const uint32_t k = key_at(x, i);
        const uint32_t d = k >> kTopShift;
        if (d == blo) a = std::max(a, k);
        if (d == bhi) c = std::min(c, k);
      }
      mx[slot] = a;
      mn[slot] = c;
    });
    p.lo = *std::max_element(mx.begin(), mx.end());
    p.hi = *std::min_element(mn.begin(), mn.end());
    return p;
  }
  std::vector<std::vector<uint32_t>> parts(slots);
  for_chunks(n, parallel, [&](int64_t b, int64_t e, int slot) {
    auto& out = parts[slot];
    for (int64_t i = b; i < e; ++i) {
      const uint32_t k = key_at(x, i);
      if ((k >> kTopShift) == blo) out.push_back(k);
    }
  });
  std::vector<uint32_t> keys;
  if (slots == 1) {
    keys.swap(parts[0]);
  } else {
    size_t total = 0;
    for (auto& v : parts) total += v.size();
    keys.reserve(total);
    for (auto& v : parts) keys.insert(keys.end(), v.begin(), v.end());
  }
  refine(keys, rlo, rhi, p.lo, p.hi);
  return p;
}

template <typename T>
float sample_threshold(const T* x, const DynamicThresholdArgs& a, bool parallel) {
  const int64_t n = a.n;
  const double pos = a.percentile * static_cast<double>(n - 1);
  const int64_t lo = std::min<int64_t>(static_cast<int64_t>(std::floor(pos)), n - 1);
  const int64_t hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(pos)), n - 1);
  const Picked p = select_sample(x, n, lo, hi, parallel);
  if (p.nan) return std::numeric_limits<float>::quiet_NaN();
  const double vlo = key_value(p.lo), vhi = key_value(p.hi);
  const double w = pos - static_cast<double>(lo);
  double s = (p.lo == p.hi || w == 0.0) ? vlo : vlo + w * (vhi - vlo);
  s = std::max(s, 1.0);
  if (a.has_max) s = std::min(s, a.max_value);
  return static_cast<float>(s);
}

template <typename T>
void apply_range(const T* x, T* y, int64_t len, float s) {
  using fVec = at::vec::Vectorized<float>;
  if (std::isnan(s)) {
    std::fill(y, y + len, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  const fVec vs(s), vns(-s);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    // plain loop: the compiler vectorises it (at::vec's portable build is slower here)
    for (; i < len; ++i) {
      float v = x[i];
      v = v < -s ? -s : v;
      v = v > s ? s : v;
      y[i] = v / s;
    }
  } else {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      auto [v0, v1] = at::vec::convert_to_float<T>(Vec::loadu(x + i));
      v0 = at::vec::minimum(at::vec::maximum(v0, vns), vs) / vs;
      v1 = at::vec::minimum(at::vec::maximum(v1, vns), vs) / vs;
      at::vec::convert_from_float<T>(v0, v1).store(y + i);
    }
  }
  for (; i < len; ++i) {
    const float v = static_cast<float>(x[i]);
    y[i] = static_cast<T>(std::min(std::max(v, -s), s) / s);
  }
}

template <typename T>
void forward(const DynamicThresholdArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t B = a.B, n = a.n;
  // Parallel over samples (selection and apply of a sample in one task: a single parallel region,
  // which matters on a loaded machine where every barrier can cost a time slice) when there are
  // enough samples to keep every thread busy; else each sample's passes are parallel.
  const bool inner = B < at::get_num_threads() && n >= 2 * kGrain;
  if (!inner) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        a.thresholds[b] = sample_threshold(x + b * n, a, false);
        if (y) apply_range(x + b * n, y + b * n, n, a.thresholds[b]);
      }
    });
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    const float s = a.thresholds[b] = sample_threshold(x + b * n, a, true);
    if (!y) continue;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      apply_range(x + b * n + begin, y + b * n + begin, end - begin, s);
    });
  }
}

}  // namespace

void dynamic_threshold_forward(const DynamicThresholdArgs& a) {
  if (a.B == 0 || a.n == 0) return;
  switch (a.dtype) {
    case DTDType::kFloat32: forward<float>(a); break;
    case DTDType::kFloat16: forward<c10::Half>(a); break;
    case DTDType::kBFloat16: forward<c10::BFloat16>(a); break;
  }
}

}  // namespace cpu
}  // namespace diffkern
