// Counter-based normal noise shared by every compiled guided_step kernel (CPU and CUDA), so that a
// seed gives the same noise on every backend: Philox4x32-10 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC 2011) on the counter (lo32(i), hi32(i), 0, 0) and key (lo32(seed),
// hi32(seed)), the first two output words turned into one normal by Box-Muller. Identical to
// diffkern/kernels/reference.py:philox_normal and to Triton's tl.philox with those counters.
// No torch headers: nvcc and the host compiler both include it.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DK_HOST_DEVICE inline
#endif

namespace diffkern {

// Philox4x32 multipliers and Weyl key increments, the float unit 2^-24 and 2 pi of the transform.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kPhiloxUnit = 5.9604644775390625e-08f;
constexpr float kTwoPi = 6.28318530717958648f;

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

DK_HOST_DEVICE PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p2 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1, c2, c3};
}

// Standard normal number `index` of the stream `seed`: u1 = (w0 >> 8 + 1) / 2^24 in (0, 1] (so the
// log is finite), u2 = (w1 >> 8) / 2^24 in [0, 1) (both exact in float32), z = sqrt(-2 ln u1) cos(2 pi u2).
DK_HOST_DEVICE float philox_normal(uint64_t seed, uint64_t index) {
  const PhiloxWords r = philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u,
                                      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u1 = static_cast<float>((r.w0 >> 8) + 1u) * kPhiloxUnit;
  const float u2 = static_cast<float>(r.w1 >> 8) * kPhiloxUnit;
  return sqrtf(-2.0f * logf(u1)) * cosf(kTwoPi * u2);
}

}  // namespace diffkern
