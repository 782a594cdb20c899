// CUDA group_norm, channels_last rows plan: one cooperative persistent kernel over row tiles (see group_norm_common.cuh for the plans and group_norm_planning.cu
// for when this one is chosen).
#include <cooperative_groups.h>

#include "group_norm_common.cuh"

namespace diffkern {
namespace cuda {
namespace gn {

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
          for (int i = 0; i < VEC; ++i) f[i] = act(fmaf(f[i] - K[i], A[i], B[i]), p.act);
          store_vec<T, VEC, false>(yt + static_cast<int64_t>(v) * VEC, f);
        }
      }
    }
    __syncthreads();  // s_m / s_stat / tile reused by the next wave
  }
}

namespace {
template <typename T>
int rows_occupancy_t(int threads, int64_t smem) {
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
}  // namespace

int rows_occupancy(DType dtype, int threads, int64_t smem) {
  switch (dtype) {
    case DType::kFloat32: return rows_occupancy_t<float>(threads, smem);
    case DType::kFloat16: return rows_occupancy_t<__half>(threads, smem);
    case DType::kBFloat16: return rows_occupancy_t<__nv_bfloat16>(threads, smem);
  }
  return 0;
}

cudaError_t launch_rows(const Plan& pl, const Params& params, DType dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    auto kern = gn_rows_kernel<T>;
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(pl.smem_bytes));
    if (e != cudaSuccess) return e;
    Params p = params;
    void* kargs[] = {&p};
    e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kern),
                                    dim3(static_cast<unsigned>(pl.grid)), dim3(pl.threads), kargs,
                                    static_cast<size_t>(pl.smem_bytes), stream);
    if (e != cudaSuccess) return e;
    return cudaGetLastError();
  });
}

}  // namespace gn
}  // namespace cuda
}  // namespace diffkern
