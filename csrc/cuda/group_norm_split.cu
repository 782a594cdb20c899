// CUDA group_norm, split plan: per-chunk partial statistics, then merge + apply (see group_norm_common.cuh for the plans and group_norm_planning.cu
// for when this one is chosen).
#include "group_norm_common.cuh"

namespace diffkern {
namespace cuda {
namespace gn {

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

cudaError_t launch_split(const Plan& pl, const Params& p, DType dtype, bool cl, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_vec<T>(pl.vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const unsigned grid = static_cast<unsigned>(pl.grid);
      if (cl) {
        gn_stats_kernel<T, VEC, true><<<grid, pl.threads, 0, stream>>>(p);
        gn_apply_kernel<T, VEC, true><<<grid, pl.threads, 0, stream>>>(p);
      } else {
        gn_stats_kernel<T, VEC, false><<<grid, pl.threads, 0, stream>>>(p);
        gn_apply_kernel<T, VEC, false><<<grid, pl.threads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace gn
}  // namespace cuda
}  // namespace diffkern
