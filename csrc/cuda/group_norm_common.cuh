// CUDA GroupNorm (+ scale-shift) (+ SiLU) forward: the pieces every plan shares. One file per plan,
// each with its kernels and a launcher that picks the template instance:
//
//  * group_norm_resident.cu: one block per (n, g). The group is loaded once from global memory into
//    dynamic shared memory (storage dtype, vectorised), statistics are an exact corrected two-pass
//    over shared memory, then y is written. x is read from DRAM exactly once. Chosen when the group
//    fits in shared memory and there are enough groups to fill the GPU (or a split would not help).
//  * group_norm_split.cu: kernel 1 (gn_stats_kernel) reduces chunks of each group to Welford/Chan
//    partials (count, mean, M2) in the workspace; kernel 2 (gn_apply_kernel) merges the group's
//    partials (Chan), writes mean/rstd and applies y = act((x - mean) * A[c] + B[c]) over its chunk.
//  * group_norm_channels_last_rows.cu: channels_last with narrow rows per group: one cooperative
//    persistent kernel over tiles of whole rows held in shared memory.
//  * group_norm_planning.cu: the host plan (shared by group_norm_workspace_elems and
//    group_norm_forward, so that the workspace always matches the launch) and the entry points.
//
// The resident and split plans walk both layouts as a flat index space of "vectors" (VEC
// consecutive elements that share one row): contiguous (NCS): the group is one contiguous run of
// D = Cg * S elements; channels_last (NSC): the group is S rows of Cg contiguous elements, rows C
// apart. Vector widths 16/8/4/2 bytes or scalar, chosen from pointer alignment and row lengths.
//
// All arithmetic is float32; element offsets are int64. No torch headers: `nvcc -c` checks each file.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../group_norm_args.h"

namespace diffkern {
namespace cuda {
namespace gn {

constexpr int kSplitThreads = 256;       // block size of the split kernels
constexpr int kMaxResidentThreads = 512; // upper block size of the resident kernel
constexpr int kABSmem = 2048;            // split apply: per-channel coefficients cached in smem
constexpr int64_t kResidentMaxBytes = 100 * 1024;  // dynamic smem cap for the resident path
constexpr int64_t kMinSplitElems = 2048; // do not split a group into chunks smaller than this
constexpr int kBlocksPerSmTarget = 4;    // split path: aim for ~4 blocks per SM
constexpr int kRowsMaxThreads = 512;     // rows path: block size cap

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

inline Divider make_divider(int64_t d, int64_t max_numerator) {
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
  int act;         // 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh form): GroupNormArgs::activation
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

// erff's polynomial kept out of line: inlined into the rows kernel's unrolled loop it made ptxas spill
// (4 bytes, sm_90a); only GELU launches call it.
__device__ __noinline__ float gelu_erf(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

__device__ __forceinline__ float act(float v, int kind) {
  // SiLU v / (1 + exp(-v)); __fdividef returns 0 for huge denominators, so v -> -inf gives -0, not NaN.
  // GELU 0.5 v (1 + erf(v / sqrt(2))); its tanh form v / (1 + exp(-2u)), u = sqrt(2 / pi) (v + 0.044715 v^3)
  // (0.5 (1 + tanh(u)) = sigmoid(2u)). kind is uniform over the launch: the branch never diverges.
  switch (kind) {
    case 1: return __fdividef(v, 1.f + __expf(-v));
    case 2: return gelu_erf(v);
    case 3: return __fdividef(v, 1.f + __expf(-1.5957691216057308f * fmaf(0.044715f * v, v * v, v)));
    default: return v;
  }
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
      f[i] = act(fmaf((f[i] - K) - ms, A, B), p.act);
    }
  } else {
    int64_t c = p.div_S.div(e);
    if (p.svec) {
      float A, B;
      getAB(c, A, B);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = act(fmaf((f[i] - K) - ms, A, B), p.act);
    } else {
      int64_t r = e - c * p.S;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float A, B;
        getAB(c, A, B);
        f[i] = act(fmaf((f[i] - K) - ms, A, B), p.act);
        if (++r == p.S) {
          r = 0;
          ++c;
        }
      }
    }
  }
}


// ------------------------------------------------------------------------------------------------
// Host-side plan, shared by the planner and the launchers.

inline int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

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

inline bool aligned(const void* ptr, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes)) == 0;
}

// channels_last with C == 1 or S == 1 has the same memory order as contiguous: use that path.
inline bool use_cl(const GroupNormArgs& a) { return a.channels_last && a.C > 1 && a.S > 1; }

inline int choose_vec(const GroupNormArgs& a) {
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(std::integral_constant<int, VEC>{}) for the plan's vector width (16-byte vectors down to 1).
template <typename T, typename F>
inline cudaError_t with_vec(int vec, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  if (vec == kMax) return f(std::integral_constant<int, kMax>{});
  if constexpr (kMax >= 4) {
    if (vec == kMax / 2) return f(std::integral_constant<int, kMax / 2>{});
  }
  if constexpr (kMax >= 8) {
    if (vec == kMax / 4) return f(std::integral_constant<int, kMax / 4>{});
  }
  return f(std::integral_constant<int, 1>{});
}

// f(T{}) for the storage type of dtype.
template <typename F>
inline cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// The launchers, one per plan file.
cudaError_t launch_resident(const Plan& pl, const Params& p, DType dtype, bool cl, cudaStream_t stream);
cudaError_t launch_split(const Plan& pl, const Params& p, DType dtype, bool cl, cudaStream_t stream);
cudaError_t launch_rows(const Plan& pl, const Params& p, DType dtype, cudaStream_t stream);
// Blocks of the rows kernel resident per SM for this configuration (0 on error).
int rows_occupancy(DType dtype, int threads, int64_t smem);

}  // namespace gn
}  // namespace cuda
}  // namespace diffkern
