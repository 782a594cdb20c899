// CUDA GroupNorm (+ scale-shift) (+ SiLU) forward.
//
// Two paths, chosen on the host by plan() (shared by group_norm_workspace_elems and
// group_norm_forward so that the workspace always matches the launch):
//
//  * resident: one block per (n, g). The group is loaded once from global memory into dynamic
//    shared memory (storage dtype, vectorised), statistics are an exact corrected two-pass over
//    shared memory, then y is written. x is read from DRAM exactly once. Chosen when the group
//    fits in shared memory and there are enough groups to fill the GPU (or a split would not
//    help anyway).
//  * split: kernel 1 (gn_stats_kernel) reduces chunks of each group to Welford/Chan partials
//    (count, mean, M2) in the workspace; kernel 2 (gn_apply_kernel) merges the group's partials
//    (Chan), writes mean/rstd and applies y = act((x - mean) * A[c] + B[c]) over its chunk.
//
// Both layouts are walked as a flat index space of "vectors" (VEC consecutive elements that share
// one row): contiguous (NCS): the group is one contiguous run of D = Cg * S elements; channels_last
// (NSC): the group is S rows of Cg contiguous elements, rows C apart. Vector widths 16/8/4/2 bytes
// or scalar, chosen from pointer alignment and row lengths.
//
// All arithmetic is float32; element offsets are int64.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../group_norm_args.h"
#include "group_norm.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kSplitThreads = 256;       // block size of the split kernels
constexpr int kMaxResidentThreads = 512; // upper block size of the resident kernel
constexpr int kABSmem = 2048;            // split apply: per-channel coefficients cached in smem
constexpr int64_t kResidentMaxBytes = 100 * 1024;  // dynamic smem cap for the resident path
constexpr int64_t kMinSplitElems = 2048; // do not split a group into chunks smaller than this
constexpr int kBlocksPerSmTarget = 4;    // split path: aim for ~4 blocks per SM

// ------------------------------------------------------------------------------------------------
// dtype helpers

// A group's biased variance, >= 0, but NaN when the group holds a NaN or +-inf (NaN variance or
// infinite mean): fmaxf(NaN, 0) = 0 would hide it behind rstd = 1/sqrt(eps) (NaN semantics of
// diffkern.ops.group_norm).
__device__ __forceinline__ float group_var(float var, float mean_shifted) {
  return (var != var || isinf(mean_shifted)) ? __int_as_float(0x7fc00000) : fmaxf(var, 0.f);
}

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw storage of VEC elements of T (2, 4, 8 or 16 bytes), moved with one memory instruction.
template <int BYTES> struct RawType;
template <> struct RawType<2> { using type = unsigned short; };
template <> struct RawType<4> { using type = unsigned int; };
template <> struct RawType<8> { using type = uint2; };
template <> struct RawType<16> { using type = uint4; };

template <typename T, int VEC> struct Vec {
  static constexpr int kBytes = VEC * (int)sizeof(T);
  // Vectors kept in flight per thread by the load loops: ~64 bytes, at least 4.
  static constexpr int kUnroll = kBytes >= 16 ? 4 : (kBytes == 8 ? 8 : 16);
  using Raw = typename RawType<kBytes>::type;
  static_assert(sizeof(Raw) == kBytes, "raw size");
};

// Load VEC elements at p (aligned to VEC * sizeof(T)) and convert to float.
template <typename T, int VEC, bool kStreaming>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  using Raw = typename Vec<T, VEC>::Raw;
  Raw r;
  if constexpr (kStreaming) {
    r = __ldcs(reinterpret_cast<const Raw*>(p));
  } else {
    r = *reinterpret_cast<const Raw*>(p);
  }
  T t[VEC];
  memcpy(t, &r, sizeof(Raw));
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = to_f<T>(t[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void load_raw(const T* p, typename Vec<T, VEC>::Raw& r) {
  r = *reinterpret_cast<const typename Vec<T, VEC>::Raw*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void raw_to_f(const typename Vec<T, VEC>::Raw& r, float (&f)[VEC]) {
  T t[VEC];
  memcpy(t, &r, sizeof(r));
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = to_f<T>(t[i]);
}

template <typename T, int VEC, bool kStreaming>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  using Raw = typename Vec<T, VEC>::Raw;
  T t[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) t[i] = from_f<T>(f[i]);
  Raw r;
  memcpy(&r, t, sizeof(Raw));
  if constexpr (kStreaming) {
    __stcs(reinterpret_cast<Raw*>(p), r);
  } else {
    *reinterpret_cast<Raw*>(p) = r;
  }
}

// ------------------------------------------------------------------------------------------------
// Division by a runtime-invariant divisor: magic-number path for numerators < 2^31, int64 otherwise.

struct Divider {
  int64_t d;
  uint32_t magic;
  uint32_t shift;
  bool big;  // numerators may reach 2^31: use plain int64 division
  __device__ __forceinline__ int64_t div(int64_t n) const {
    if (big) return n / d;
    const uint32_t un = static_cast<uint32_t>(n);
    return static_cast<int64_t>((__umulhi(un, magic) + un) >> shift);
  }
};

Divider make_divider(int64_t d, int64_t max_numerator) {
  Divider r;
  r.d = d < 1 ? 1 : d;
  r.big = max_numerator >= (int64_t(1) << 31) || r.d >= (int64_t(1) << 31);
  r.magic = 0;
  r.shift = 0;
  if (!r.big) {
    uint32_t s = 0;
    while (s < 32 && (uint64_t(1) << s) < static_cast<uint64_t>(r.d)) ++s;
    const uint64_t one = 1;
    const uint64_t m = ((one << 32) * ((one << s) - static_cast<uint64_t>(r.d))) /
                           static_cast<uint64_t>(r.d) + 1;
    r.magic = static_cast<uint32_t>(m);
    r.shift = s;
  }
  return r;
}

// ------------------------------------------------------------------------------------------------
// Kernel parameters (passed by value).

struct Params {
  const void* x;
  void* y;
  const void* weight;
  const void* bias;
  const void* scale;
  const void* shift;
  float* mean;
  float* rstd;
  float* ws;
  int64_t N, C, S, G, Cg, D, NG;
  int64_t nvec;    // vectors per group: D / VEC
  int64_t Lv;      // channels_last: vectors per row (Cg / VEC)
  int64_t splits;  // split path: chunks per group
  int64_t buf_bytes;  // resident: bytes of the group buffer (multiple of 16)
  Divider div_S;   // contiguous: group-local element index -> local channel
  Divider div_Lv;  // channels_last: vector index -> row
  Divider div_splits;  // block index -> (group, split)
  Divider div_G;   // group index -> (n, g)
  float eps;
  bool silu;
  bool svec;       // contiguous: S % VEC == 0 (a vector never straddles channels)
  // rows path (channels_last, gn_rows_kernel)
  int rl_Cv;       // 16-byte vectors per row (C / VEC)
  int rl_R;        // rows covered by one pass of the block (blockDim.x == rl_R * rl_Cv)
  int rl_TR;       // rows per tile (one tile per block per wave)
  int rl_RB;       // tiles per sample
  int rl_Nw;       // samples per wave
  int rl_waves;    // waves
  int64_t rl_tile_bytes;  // dynamic smem bytes of the tile (multiple of 16)
};

// Chan/Welford merge of (nb, mb, M2b) into (n, m, M2).
__device__ __forceinline__ void chan_merge(float& n, float& m, float& M2, float nb, float mb,
                                           float M2b) {
  if (nb == 0.f) return;
  if (n == 0.f) {
    n = nb; m = mb; M2 = M2b;
    return;
  }
  const float nn = n + nb;
  const float d = mb - m;
  const float r = __fdividef(nb, nn);
  m = fmaf(d, r, m);
  M2 = M2 + M2b + d * d * n * r;
  n = nn;
}

__device__ __forceinline__ void warp_chan(float& n, float& m, float& M2) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, o);
    const float mb = __shfl_xor_sync(0xffffffffu, m, o);
    const float M2b = __shfl_xor_sync(0xffffffffu, M2, o);
    chan_merge(n, m, M2, nb, mb, M2b);
  }
}

// Block-wide Chan reduction; every thread gets the result. `red` holds >= 3 * 32 floats.
// Contains __syncthreads(); all threads must call it.
__device__ __forceinline__ void block_chan(float& n, float& m, float& M2, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  warp_chan(n, m, M2);
  __syncthreads();  // protect `red` from a previous use
  if (lane == 0) {
    red[warp] = n; red[32 + warp] = m; red[64 + warp] = M2;
  }
  __syncthreads();
  if (warp == 0) {
    n = lane < nwarps ? red[lane] : 0.f;
    m = lane < nwarps ? red[32 + lane] : 0.f;
    M2 = lane < nwarps ? red[64 + lane] : 0.f;
    warp_chan(n, m, M2);
    if (lane == 0) {
      red[0] = n; red[32] = m; red[64] = M2;
    }
  }
  __syncthreads();
  n = red[0]; m = red[32]; M2 = red[64];
}

// Block-wide sum of two floats; every thread gets the result. Contains __syncthreads().
__device__ __forceinline__ void block_sum2(float& a, float& b, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  __syncthreads();
  if (lane == 0) {
    red[warp] = a; red[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < nwarps ? red[lane] : 0.f;
    b = lane < nwarps ? red[32 + lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_xor_sync(0xffffffffu, a, o);
      b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (lane == 0) {
      red[0] = a; red[32] = b;
    }
  }
  __syncthreads();
  a = red[0]; b = red[32];
}

// Per-channel affine coefficients: y_pre = (x - mean) * A + B.
template <typename T>
__device__ __forceinline__ void channel_coeffs(const Params& p, int64_t n, int64_t c, float rstd,
                                               float& A, float& B) {
  const float w = p.weight ? to_f<T>(static_cast<const T*>(p.weight)[c]) : 1.f;
  const float b = p.bias ? to_f<T>(static_cast<const T*>(p.bias)[c]) : 0.f;
  float sc = 1.f, sh = 0.f;
  if (p.scale) {
    sc = 1.f + to_f<T>(static_cast<const T*>(p.scale)[n * p.C + c]);
    sh = to_f<T>(static_cast<const T*>(p.shift)[n * p.C + c]);
  }
  A = rstd * w * sc;
  B = fmaf(b, sc, sh);
}

__device__ __forceinline__ float act(float v, bool silu) {
  // v / (1 + exp(-v)); __fdividef returns 0 for huge denominators, so v -> -inf gives -0, not NaN.
  return silu ? __fdividef(v, 1.f + __expf(-v)) : v;
}

// Global element offset (relative to the group base) of vector v of a group.
template <bool CL, int VEC>
__device__ __forceinline__ int64_t vec_offset(const Params& p, int64_t v, int64_t& l_out) {
  if constexpr (CL) {
    const int64_t r = p.div_Lv.div(v);
    const int64_t l = v - r * p.Lv;
    l_out = l;
    return r * p.C + l * VEC;
  } else {
    l_out = 0;
    return v * VEC;
  }
}

// Group base element offset.
template <bool CL>
__device__ __forceinline__ int64_t group_base(const Params& p, int64_t n, int64_t g) {
  return CL ? n * p.C * p.S + g * p.Cg : n * p.C * p.S + g * p.D;
}

// Apply coefficients to a vector of VEC elements and act. e: group-local index of element 0
// (contiguous), l: vector column within the row (channels_last). getAB(local_channel, A, B).
// The group mean is carried as K + ms (K: the group's first element, ms: mean of x - K), so that
// x - K is exact for x near the mean and no precision is lost to |mean| >> std.
template <bool CL, int VEC, typename GetAB>
__device__ __forceinline__ void apply_vec(const Params& p, float (&f)[VEC], float K, float ms,
                                          int64_t e, int64_t l, const GetAB& getAB) {
  if constexpr (CL) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float A, B;
      getAB(l * VEC + i, A, B);
      f[i] = act(fmaf((f[i] - K) - ms, A, B), p.silu);
    }
  } else {
    int64_t c = p.div_S.div(e);
    if (p.svec) {
      float A, B;
      getAB(c, A, B);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = act(fmaf((f[i] - K) - ms, A, B), p.silu);
    } else {
      int64_t r = e - c * p.S;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float A, B;
        getAB(c, A, B);
        f[i] = act(fmaf((f[i] - K) - ms, A, B), p.silu);
        if (++r == p.S) {
          r = 0;
          ++c;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Resident path: one block per (n, g), group held in dynamic shared memory.

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kMaxResidentThreads)
gn_resident_kernel(Params p) {
  using Raw = typename Vec<T, VEC>::Raw;
  constexpr int U = Vec<T, VEC>::kUnroll;  // vectors in flight per thread
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[96];
  Raw* buf = reinterpret_cast<Raw*>(smem);
  float* sA = reinterpret_cast<float*>(smem + p.buf_bytes);
  float* sB = sA + p.Cg;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const float inv_D = 1.f / static_cast<float>(p.D);

  for (int64_t ng = blockIdx.x; ng < p.NG; ng += gridDim.x) {
    const int64_t n = p.div_G.div(ng);
    const int64_t g = ng - n * p.G;
    const int64_t base = group_base<CL>(p, n, g);
    const T* xg = x + base;
    T* yg = y + base;
    const float K = to_f<T>(xg[0]);  // shift for the first pass

    // Pass 0: global -> smem, accumulating sum(x - K).
    float s0 = 0.f;
    for (int64_t v0 = tid; v0 < p.nvec; v0 += (int64_t)U * bs) {
      Raw r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < p.nvec) {
          int64_t l;
          load_raw<T, VEC>(xg + vec_offset<CL, VEC>(p, v, l), r[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < p.nvec) {
          buf[v] = r[u];
          float f[VEC];
          raw_to_f<T, VEC>(r[u], f);
#pragma unroll
          for (int i = 0; i < VEC; ++i) s0 += f[i] - K;
        }
      }
    }
    float dummy = 0.f;
    block_sum2(s0, dummy, red);
    const float ms0 = s0 * inv_D;  // mean of x - K, first estimate

    // Pass 1 (smem): corrected two-pass: s1 = sum(x - mean0), s2 = sum((x - mean0)^2).
    float s1 = 0.f, s2 = 0.f;
    for (int64_t v = tid; v < p.nvec; v += bs) {
      float f[VEC];
      raw_to_f<T, VEC>(buf[v], f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = (f[i] - K) - ms0;
        s1 += d;
        s2 = fmaf(d, d, s2);
      }
    }
    block_sum2(s1, s2, red);
    const float ms = ms0 + s1 * inv_D;
    const float var = group_var((s2 - s1 * s1 * inv_D) * inv_D, ms);
    const float rstd = rsqrtf(var + p.eps);
    if (tid == 0) {
      p.mean[ng] = K + ms;
      p.rstd[ng] = rstd;
    }
    for (int64_t cl = tid; cl < p.Cg; cl += bs) {
      float A, B;
      channel_coeffs<T>(p, n, g * p.Cg + cl, rstd, A, B);
      sA[cl] = A;
      sB[cl] = B;
    }
    __syncthreads();

    // Pass 2: smem -> y.
    auto getAB = [&](int64_t c, float& A, float& B) {
      A = sA[c];
      B = sB[c];
    };
    for (int64_t v = tid; v < p.nvec; v += bs) {
      float f[VEC];
      raw_to_f<T, VEC>(buf[v], f);
      int64_t l;
      const int64_t off = vec_offset<CL, VEC>(p, v, l);
      apply_vec<CL, VEC>(p, f, K, ms, v * VEC, l, getAB);
      store_vec<T, VEC, false>(yg + off, f);
    }
    __syncthreads();  // buf / sA reused by the next group of this block
  }
}

// ------------------------------------------------------------------------------------------------
// Split path, kernel 1: per-chunk Welford partials (count, mean of x - K, M2) into p.ws, where K
// is the group's first element.

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSplitThreads)
gn_stats_kernel(Params p) {
  constexpr int U = Vec<T, VEC>::kUnroll;
  __shared__ float red[96];
  const T* x = static_cast<const T*>(p.x);
  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const int64_t total = p.NG * p.splits;
  const int64_t per = (p.nvec + p.splits - 1) / p.splits;
  constexpr float kInvVec = 1.f / VEC;

  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t ng = p.div_splits.div(blk);
    const int64_t sp = blk - ng * p.splits;
    const int64_t n = p.div_G.div(ng);
    const int64_t g = ng - n * p.G;
    const T* xg = x + group_base<CL>(p, n, g);
    const int64_t vbeg = sp * per;
    const int64_t vend = min(vbeg + per, p.nvec);
    const float K = to_f<T>(xg[0]);  // group-wide shift, see apply_vec

    float cnt = 0.f, m = 0.f, M2 = 0.f;
    for (int64_t v0 = vbeg + tid; v0 < vend; v0 += (int64_t)U * bs) {
      float f[U][VEC];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < vend) {
          int64_t l;
          load_vec<T, VEC, false>(xg + vec_offset<CL, VEC>(p, v, l), f[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < vend) {
          float vm = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            f[u][i] -= K;
            vm += f[u][i];
          }
          vm *= kInvVec;
          float vM2 = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float d = f[u][i] - vm;
            vM2 = fmaf(d, d, vM2);
          }
          chan_merge(cnt, m, M2, static_cast<float>(VEC), vm, vM2);
        }
      }
    }
    block_chan(cnt, m, M2, red);
    if (tid == 0) {
      float* w = p.ws + blk * 3;
      w[0] = cnt;
      w[1] = m;
      w[2] = M2;
    }
    // block_chan starts with a __syncthreads, so `red` is safe to reuse in the next iteration.
  }
}

// Split path, kernel 2: merge the group's partials, write mean/rstd (split 0), apply to the chunk.

template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kSplitThreads)
gn_apply_kernel(Params p) {
  constexpr int U = Vec<T, VEC>::kUnroll > 8 ? 8 : Vec<T, VEC>::kUnroll;
  __shared__ float red[96];
  __shared__ float sA[kABSmem];
  __shared__ float sB[kABSmem];
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int tid = threadIdx.x;
  const int bs = blockDim.x;
  const int64_t total = p.NG * p.splits;
  const int64_t per = (p.nvec + p.splits - 1) / p.splits;

  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {
    const int64_t ng = p.div_splits.div(blk);
    const int64_t sp = blk - ng * p.splits;
    const int64_t n = p.div_G.div(ng);
    const int64_t g = ng - n * p.G;
    const int64_t base = group_base<CL>(p, n, g);
    const T* xg = x + base;
    T* yg = y + base;
    const int64_t vbeg = sp * per;
    const int64_t vend = min(vbeg + per, p.nvec);
    const float K = to_f<T>(xg[0]);

    // Merge the partials of this group.
    float cnt = 0.f, m = 0.f, M2 = 0.f;
    const float* w = p.ws + ng * p.splits * 3;
    for (int64_t j = tid; j < p.splits; j += bs) {
      chan_merge(cnt, m, M2, w[3 * j], w[3 * j + 1], w[3 * j + 2]);
    }
    block_chan(cnt, m, M2, red);
    const float ms = m;  // mean of x - K
    const float var = cnt > 0.f ? group_var(M2 / cnt, ms) : 0.f;
    const float rstd = rsqrtf(var + p.eps);
    if (sp == 0 && tid == 0) {
      p.mean[ng] = K + ms;
      p.rstd[ng] = rstd;
    }
    if (vbeg >= vend) continue;  // empty chunk (uniform across the block)

    // Local channels touched by this chunk: [c_lo, c_hi].
    int64_t c_lo = 0, c_hi = p.Cg - 1;
    if constexpr (!CL) {
      c_lo = p.div_S.div(vbeg * VEC);
      c_hi = p.div_S.div(vend * VEC - 1);
    }
    const bool ab_smem = (c_hi - c_lo + 1) <= kABSmem;
    if (ab_smem) {
      for (int64_t cl = c_lo + tid; cl <= c_hi; cl += bs) {
        float A, B;
        channel_coeffs<T>(p, n, g * p.Cg + cl, rstd, A, B);
        sA[cl - c_lo] = A;
        sB[cl - c_lo] = B;
      }
    }
    __syncthreads();
    auto getAB = [&](int64_t c, float& A, float& B) {
      if (ab_smem) {
        A = sA[c - c_lo];
        B = sB[c - c_lo];
      } else {
        channel_coeffs<T>(p, n, g * p.Cg + c, rstd, A, B);
      }
    };

    for (int64_t v0 = vbeg + tid; v0 < vend; v0 += (int64_t)U * bs) {
      float f[U][VEC];
      int64_t off[U], l[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < vend) {
          off[u] = vec_offset<CL, VEC>(p, v, l[u]);
          load_vec<T, VEC, true>(xg + off[u], f[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t v = v0 + (int64_t)u * bs;
        if (v < vend) {
          apply_vec<CL, VEC>(p, f[u], K, ms, v * VEC, l[u], getAB);
          store_vec<T, VEC, true>(yg + off[u], f[u]);
        }
      }
    }
    __syncthreads();  // sA/sB reused by the next chunk of this block
  }
}


// ------------------------------------------------------------------------------------------------
// Rows path (channels_last, C % (16 / sizeof(T)) == 0): one cooperative persistent kernel.
//
// The batch is processed in waves of rl_Nw samples. In a wave, block b owns tile rb = b % RB of
// sample n = wave * Nw + b / RB: rows [rb * TR, rb * TR + TR) x all C channels, one contiguous
// range of memory. The tile is copied global -> shared memory with cp.async (16-byte vectors,
// fully coalesced, everything in flight at once); thread (ry, cv) owns the vectors of column cv in
// rows ry, ry + R, ... and accumulates per-channel Welford statistics of x - K_g over them, where
// K_g is the group's first element (x[n, s = 0, g * Cg]); the block merges them (Chan) per group
// into one partial per (sample, group, tile) in the workspace. A grid-wide barrier later every
// block merges the partials of its sample, and applies y = act((x - K) * A + (B - ms * A)) to the
// tile still held in shared memory. x is read from DRAM exactly once, y written once.

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most n of this thread's cp.async groups are pending (n clamped to 7: stricter).
__device__ __forceinline__ void cp_async_wait(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
  }
}

constexpr int kRowsMaxThreads = 512;
constexpr int kRowsChunk = 2;  // vectors per thread per cp.async group

template <typename T>
__global__ void __launch_bounds__(kRowsMaxThreads, 2)
gn_rows_kernel(Params p) {
  constexpr int VEC = 16 / (int)sizeof(T);
  constexpr int U = kRowsChunk;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int nthr = blockDim.x;  // == R * Cv
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthr >> 5;
  const int Cv = p.rl_Cv, R = p.rl_R, TR = p.rl_TR, RB = p.rl_RB, Nw = p.rl_Nw;
  const int C = static_cast<int>(p.C), G = static_cast<int>(p.G), Cg = static_cast<int>(p.Cg);
  const int cv = tid % Cv;
  const int ry = tid / Cv;

  uint4* tile = reinterpret_cast<uint4*>(smem);                       // TR * Cv vectors
  float* s_m = reinterpret_cast<float*>(smem + p.rl_tile_bytes);      // nthr * VEC
  float* s_M2 = s_m + nthr * VEC;                                     // nthr * VEC
  float* s_cnt = s_M2 + nthr * VEC;                                   // R
  float* s_stat = s_cnt + R;                                          // 2 * G

  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t SC = p.S * p.C;
  const int c0 = cv * VEC;

  const int nl = blockIdx.x / RB;
  const int rb = blockIdx.x - nl * RB;
  const int64_t row0 = static_cast<int64_t>(rb) * TR;
  const int rows = static_cast<int>(min(static_cast<int64_t>(TR), p.S - row0));
  const int nv = rows * Cv;  // vectors in this tile
  const int kmax = (TR + R - 1) / R;
  const int KC = (kmax + U - 1) / U;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();

  for (int w = 0; w < p.rl_waves; ++w) {
    const int64_t n = static_cast<int64_t>(w) * Nw + nl;
    const bool active = n < p.N;  // uniform across the block
    float* part = p.ws + static_cast<int64_t>(w & 1) * Nw * G * RB * 3;
    const T* xs = x + n * SC;
    float K[VEC], wsc[VEC], bsc[VEC];
    if (active) {
      const T* xt = xs + row0 * C;
      for (int j = 0; j < KC; ++j) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = tid + (j * U + u) * nthr;
          if (v < nv) cp_async16(tile + v, xt + static_cast<int64_t>(v) * VEC);
        }
        cp_async_commit();
      }
      float m[VEC], M2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        K[i] = to_f<T>(xs[((c0 + i) / Cg) * Cg]);  // the group's first element
        m[i] = 0.f;
        M2[i] = 0.f;
      }
      float cnt = 0.f;
      for (int j = 0; j < KC; ++j) {
        cp_async_wait(KC - 1 - j);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int v = tid + (j * U + u) * nthr;
          if (v < nv) {
            float f[VEC];
            raw_to_f<T, VEC>(tile[v], f);
            cnt += 1.f;
            const float rc = __frcp_rn(cnt);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float d = f[i] - K[i];
              const float delta = d - m[i];
              m[i] = fmaf(delta, rc, m[i]);
              M2[i] = fmaf(delta, d - m[i], M2[i]);
            }
          }
        }
      }
      float4* pm = reinterpret_cast<float4*>(s_m + tid * VEC);
      float4* pM = reinterpret_cast<float4*>(s_M2 + tid * VEC);
#pragma unroll
      for (int i = 0; i < VEC / 4; ++i) {
        pm[i] = make_float4(m[4 * i], m[4 * i + 1], m[4 * i + 2], m[4 * i + 3]);
        pM[i] = make_float4(M2[4 * i], M2[4 * i + 1], M2[4 * i + 2], M2[4 * i + 3]);
      }
      if (cv == 0) s_cnt[ry] = cnt;
      // Per-channel parts of the coefficients (independent of the statistics).
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int c = c0 + i;
        const float wt = p.weight ? to_f<T>(static_cast<const T*>(p.weight)[c]) : 1.f;
        const float bi = p.bias ? to_f<T>(static_cast<const T*>(p.bias)[c]) : 0.f;
        float sc = 1.f, sh = 0.f;
        if (p.scale) {
          sc = 1.f + to_f<T>(static_cast<const T*>(p.scale)[n * p.C + c]);
          sh = to_f<T>(static_cast<const T*>(p.shift)[n * p.C + c]);
        }
        wsc[i] = wt * sc;
        bsc[i] = fmaf(bi, sc, sh);
      }
    }
    __syncthreads();
    if (active) {
      // One warp per group: merge the R x Cg per-(row-thread, channel) Welford states.
      const int items = R * Cg;
      for (int g = warp; g < G; g += nwarps) {
        float c = 0.f, mm = 0.f, MM = 0.f;
        for (int j = lane; j < items; j += 32) {
          const int r = j / Cg;
          const int idx = r * C + g * Cg + (j - r * Cg);
          chan_merge(c, mm, MM, s_cnt[r], s_m[idx], s_M2[idx]);
        }
        warp_chan(c, mm, MM);
        if (lane == 0) {
          float* q = part + ((static_cast<int64_t>(nl) * G + g) * RB + rb) * 3;
          q[0] = c;
          q[1] = mm;
          q[2] = MM;
        }
      }
    }
    grid.sync();
    if (active) {
      for (int g = warp; g < G; g += nwarps) {
        float c = 0.f, mm = 0.f, MM = 0.f;
        const float* q = part + (static_cast<int64_t>(nl) * G + g) * RB * 3;
        for (int j = lane; j < RB; j += 32) {
          chan_merge(c, mm, MM, __ldcg(q + 3 * j), __ldcg(q + 3 * j + 1), __ldcg(q + 3 * j + 2));
        }
        warp_chan(c, mm, MM);
        if (lane == 0) {
          const float var = c > 0.f ? group_var(MM / c, mm) : 0.f;
          const float rstd = rsqrtf(var + p.eps);
          s_stat[2 * g] = mm;
          s_stat[2 * g + 1] = rstd;
          if (rb == 0) {
            p.mean[n * G + g] = to_f<T>(xs[g * Cg]) + mm;
            p.rstd[n * G + g] = rstd;
          }
        }
      }
      __syncthreads();
      float A[VEC], B[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int g = (c0 + i) / Cg;
        A[i] = s_stat[2 * g + 1] * wsc[i];
        B[i] = fmaf(-s_stat[2 * g], A[i], bsc[i]);  // y_pre = (x - K) * A + (B - ms * A)
      }
      T* yt = y + n * SC + row0 * C;
      for (int k = 0; k < kmax; ++k) {
        const int v = tid + k * nthr;
        if (v < nv) {
          float f[VEC];
          raw_to_f<T, VEC>(tile[v], f);
#pragma unroll
          for (int i = 0; i < VEC; ++i) f[i] = act(fmaf(f[i] - K[i], A[i], B[i]), p.silu);
          store_vec<T, VEC, false>(yt + static_cast<int64_t>(v) * VEC, f);
        }
      }
    }
    __syncthreads();  // s_m / s_stat / tile reused by the next wave
  }
}

// ------------------------------------------------------------------------------------------------
// Host-side planning.

int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

struct Plan {
  bool resident = false;
  int vec = 1;
  int64_t splits = 1;
  int threads = kSplitThreads;
  int64_t smem_bytes = 0;  // resident: dynamic shared memory
  int64_t grid = 1;
  int64_t ws_elems = 0;
  // rows path (channels_last): cooperative gn_rows_kernel
  bool rows = false;
  int rl_R = 0, rl_TR = 0, rl_RB = 0, rl_Nw = 0, rl_waves = 0;
  int64_t rl_tile_bytes = 0;
};

bool aligned(const void* ptr, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes)) == 0;
}

// channels_last with C == 1 or S == 1 has the same memory order as contiguous: use that path.
bool use_cl(const GroupNormArgs& a) { return a.channels_last && a.C > 1 && a.S > 1; }

int choose_vec(const GroupNormArgs& a) {
  const int es = elem_size(a.dtype);
  const int64_t Cg = a.C / a.G;
  const int64_t D = Cg * a.S;
  for (int vec = 16 / es; vec > 1; vec /= 2) {
    if (!aligned(a.x, (int64_t)vec * es) || !aligned(a.y, (int64_t)vec * es)) continue;
    if (use_cl(a)) {
      if (Cg % vec == 0 && a.C % vec == 0) return vec;
    } else {
      if (D % vec == 0) return vec;
    }
  }
  return 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of gn_rows_kernel<T> resident per SM for this configuration (0 on error).
template <typename T>
int rows_occupancy(int threads, int64_t smem) {
  auto kern = gn_rows_kernel<T>;
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  int nb = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kern, threads,
                                                    static_cast<size_t>(smem)) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return nb;
}

// Plans the rows path (channels_last); false when it does not apply.
bool make_rows_plan(const GroupNormArgs& a, int num_sms, Plan& pl) {
  if (!use_cl(a)) return false;
  const int es = elem_size(a.dtype);
  // The per-(n, g) paths read rows of Cg channels with choose_vec-wide vectors; measured on H200
  // they beat this path when those vectors are >= 8 bytes (e.g. Cg = 40 for fp16), and lose by
  // 1.5-1.8x when they are 2-4 bytes (Cg = 10, 6: SD / GLIDE). Use this path only in that case.
  if (choose_vec(a) * es > 4) return false;
  const int vec = 16 / es;
  if (a.C % vec != 0 || !aligned(a.x, 16) || !aligned(a.y, 16)) return false;
  const int64_t Cv = a.C / vec;
  if (Cv > kRowsMaxThreads) return false;
  int64_t R = std::max<int64_t>(1, kRowsMaxThreads / Cv);
  R = std::min<int64_t>(R, a.S);
  int64_t threads = R * Cv;
  if (threads % 32 != 0) {  // keep whole warps: the group reductions use full-warp shuffles
    // round R down to make R * Cv a multiple of 32 when possible, else pad is not allowed: bail
    int64_t R2 = R;
    while (R2 > 1 && (R2 * Cv) % 32 != 0) --R2;
    if ((R2 * Cv) % 32 != 0) return false;
    R = R2;
    threads = R * Cv;
  }
  int dev = 0, real_sms = 0, smem_sm = 0, optin = 0, coop = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&real_sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (!coop || real_sms < 1) return false;
  const int sms = std::min(num_sms, real_sms);
  const int64_t row_bytes = a.C * es;
  const int64_t scratch = threads * vec * 2 * 4 + R * 4 + 2 * a.G * 4;
  // Aim at two blocks per SM (1 KB of shared memory is reserved per block).
  const int64_t budget = std::min<int64_t>(optin, smem_sm / 2 - 1024);
  const int64_t TRmax = (budget - scratch) / row_bytes;
  if (TRmax < 1) return false;
  int occ = 0;
  switch (a.dtype) {
    case DType::kFloat32: occ = rows_occupancy<float>((int)threads, TRmax * row_bytes + scratch); break;
    case DType::kFloat16: occ = rows_occupancy<__half>((int)threads, TRmax * row_bytes + scratch); break;
    case DType::kBFloat16:
      occ = rows_occupancy<__nv_bfloat16>((int)threads, TRmax * row_bytes + scratch);
      break;
  }
  if (occ < 1) return false;
  const int64_t P = static_cast<int64_t>(occ) * sms;  // co-resident blocks
  const int64_t RBmin = ceil_div(a.S, TRmax);
  if (RBmin > P) return false;  // one sample does not fit in the whole GPU's shared memory
  const int64_t Nwmax = std::min<int64_t>(a.N, P / RBmin);
  const int64_t waves = ceil_div(a.N, Nwmax);
  const int64_t Nw = ceil_div(a.N, waves);
  int64_t RB = std::min<int64_t>(P / Nw, ceil_div(a.S, R));
  RB = std::max<int64_t>(RB, RBmin);
  const int64_t TR = ceil_div(a.S, RB);
  RB = ceil_div(a.S, TR);
  if (waves > 0x7fffffff) return false;
  pl.rows = true;
  pl.resident = false;
  pl.vec = vec;
  pl.splits = RB;
  pl.threads = static_cast<int>(threads);
  pl.rl_R = static_cast<int>(R);
  pl.rl_TR = static_cast<int>(TR);
  pl.rl_RB = static_cast<int>(RB);
  pl.rl_Nw = static_cast<int>(Nw);
  pl.rl_waves = static_cast<int>(waves);
  pl.rl_tile_bytes = TR * row_bytes;
  pl.smem_bytes = TR * row_bytes + scratch;
  pl.grid = Nw * RB;
  pl.ws_elems = 2 * Nw * a.G * RB * 3;
  return true;
}

Plan make_plan(const GroupNormArgs& a, int num_sms) {
  Plan pl;
  if (num_sms < 1) num_sms = 1;
  if (make_rows_plan(a, num_sms, pl)) return pl;
  const int es = elem_size(a.dtype);
  const int64_t Cg = a.C / a.G;
  const int64_t D = Cg * a.S;
  const int64_t NG = a.N * a.G;
  pl.vec = choose_vec(a);
  const int64_t nvec = D / pl.vec;

  // Split factor the split path would use.
  int64_t splits = ceil_div((int64_t)kBlocksPerSmTarget * num_sms, NG);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, D / kMinSplitElems));
  splits = std::min<int64_t>(splits, nvec);
  splits = std::max<int64_t>(splits, 1);

  // Resident feasibility.
  int optin = 48 * 1024;
  {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
        v > 0) {
      optin = v;
    } else {
      (void)cudaGetLastError();  // clear a sticky-free error from the failed query
    }
  }
  const int64_t buf_bytes = ceil_div(D * es, 16) * 16;
  const int64_t smem = buf_bytes + 8 * Cg;
  const int64_t smem_cap = std::min<int64_t>(kResidentMaxBytes, (int64_t)optin - 1024);
  const bool fits = smem <= smem_cap;
  if (fits && (NG >= 2 * (int64_t)num_sms || splits == 1)) {
    pl.resident = true;
    pl.smem_bytes = smem;
    int64_t t = ceil_div(ceil_div(nvec, 8), 32) * 32;
    t = std::max<int64_t>(128, std::min<int64_t>(kMaxResidentThreads, t));
    pl.threads = static_cast<int>(t);
    pl.grid = std::min<int64_t>(NG, 0x7fffffff);
    pl.splits = 1;
    pl.ws_elems = 0;
  } else {
    pl.resident = false;
    pl.splits = splits;
    pl.threads = kSplitThreads;
    pl.grid = std::min<int64_t>(NG * splits, 0x7fffffff);
    pl.ws_elems = NG * splits * 3;
  }
  return pl;
}

template <typename T, int VEC, bool CL>
cudaError_t launch(const Plan& pl, Params p, cudaStream_t stream) {
  if (pl.resident) {
    auto kern = gn_resident_kernel<T, VEC, CL>;
    if (pl.smem_bytes > 48 * 1024) {
      cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(pl.smem_bytes));
      if (e != cudaSuccess) return e;
    }
    kern<<<static_cast<unsigned>(pl.grid), pl.threads, static_cast<size_t>(pl.smem_bytes), stream>>>(p);
  } else {
    gn_stats_kernel<T, VEC, CL><<<static_cast<unsigned>(pl.grid), pl.threads, 0, stream>>>(p);
    gn_apply_kernel<T, VEC, CL><<<static_cast<unsigned>(pl.grid), pl.threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T, bool CL>
cudaError_t dispatch_vec(const Plan& pl, const Params& p, cudaStream_t s) {
  constexpr int kMax = 16 / (int)sizeof(T);
  switch (pl.vec) {
    case kMax: return launch<T, kMax, CL>(pl, p, s);
    case (kMax >= 4 ? kMax / 2 : 1):
      if constexpr (kMax >= 4) return launch<T, kMax / 2, CL>(pl, p, s);
      break;
    case (kMax >= 8 ? kMax / 4 : 3):
      if constexpr (kMax >= 8) return launch<T, kMax / 4, CL>(pl, p, s);
      break;
    default: break;
  }
  return launch<T, 1, CL>(pl, p, s);
}

template <typename T>
cudaError_t launch_rows(const Plan& pl, Params p, cudaStream_t stream) {
  auto kern = gn_rows_kernel<T>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(pl.smem_bytes));
  if (e != cudaSuccess) return e;
  void* kargs[] = {&p};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kern),
                                  dim3(static_cast<unsigned>(pl.grid)), dim3(pl.threads), kargs,
                                  static_cast<size_t>(pl.smem_bytes), stream);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_layout(const Plan& pl, const Params& p, bool cl, cudaStream_t s) {
  if (pl.rows) return launch_rows<T>(pl, p, s);
  return cl ? dispatch_vec<T, true>(pl, p, s) : dispatch_vec<T, false>(pl, p, s);
}

}  // namespace

int64_t group_norm_workspace_elems(const GroupNormArgs& args, int num_sms) {
  if (args.N <= 0 || args.C <= 0 || args.S <= 0 || args.G <= 0 || args.C % args.G != 0) return 0;
  return make_plan(args, num_sms).ws_elems;
}

cudaError_t group_norm_forward(const GroupNormArgs& args, float* workspace, int num_sms,
                               cudaStream_t stream) {
  if (args.N <= 0 || args.C <= 0 || args.S <= 0) return cudaSuccess;  // nothing to do
  if (args.G <= 0 || args.C % args.G != 0) return cudaErrorInvalidValue;
  if (!args.x || !args.y || !args.mean || !args.rstd) return cudaErrorInvalidValue;
  if ((args.scale == nullptr) != (args.shift == nullptr)) return cudaErrorInvalidValue;
  const Plan pl = make_plan(args, num_sms);
  if (pl.ws_elems > 0 && workspace == nullptr) return cudaErrorInvalidValue;

  Params p;
  p.x = args.x;
  p.y = args.y;
  p.weight = args.weight;
  p.bias = args.bias;
  p.scale = args.scale;
  p.shift = args.shift;
  p.mean = args.mean;
  p.rstd = args.rstd;
  p.ws = workspace;
  p.N = args.N;
  p.C = args.C;
  p.S = args.S;
  p.G = args.G;
  p.Cg = args.C / args.G;
  p.D = p.Cg * args.S;
  p.NG = args.N * args.G;
  p.nvec = p.D / pl.vec;
  p.Lv = p.Cg / pl.vec;
  p.splits = pl.splits;
  p.buf_bytes = pl.resident ? ceil_div(p.D * elem_size(args.dtype), 16) * 16 : 0;
  p.div_S = make_divider(args.S, p.D);
  p.div_Lv = make_divider(p.Lv, p.nvec);
  p.div_splits = make_divider(pl.splits, p.NG * pl.splits);
  p.div_G = make_divider(args.G, p.NG);
  p.eps = args.eps;
  p.silu = args.silu;
  p.svec = (args.S % pl.vec) == 0;
  p.rl_Cv = pl.rows ? static_cast<int>(args.C / pl.vec) : 0;
  p.rl_R = pl.rl_R;
  p.rl_TR = pl.rl_TR;
  p.rl_RB = pl.rl_RB;
  p.rl_Nw = pl.rl_Nw;
  p.rl_waves = pl.rl_waves;
  p.rl_tile_bytes = pl.rl_tile_bytes;

  const bool cl = use_cl(args);
  switch (args.dtype) {
    case DType::kFloat32: return dispatch_layout<float>(pl, p, cl, stream);
    case DType::kFloat16: return dispatch_layout<__half>(pl, p, cl, stream);
    case DType::kBFloat16: return dispatch_layout<__nv_bfloat16>(pl, p, cl, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace diffkern
