// CUDA group_norm, resident plan: one block per (n, g), the group held in shared memory (see group_norm_common.cuh for the plans and group_norm_planning.cu
// for when this one is chosen).
#include "group_norm_common.cuh"

namespace diffkern {
namespace cuda {
namespace gn {

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

cudaError_t launch_resident(const Plan& pl, const Params& p, DType dtype, bool cl, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return with_vec<T>(pl.vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      auto kern = cl ? gn_resident_kernel<T, VEC, true> : gn_resident_kernel<T, VEC, false>;
      if (pl.smem_bytes > 48 * 1024) {
        const cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(pl.smem_bytes));
        if (e != cudaSuccess) return e;
      }
      kern<<<static_cast<unsigned>(pl.grid), pl.threads, static_cast<size_t>(pl.smem_bytes), stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace gn
}  // namespace cuda
}  // namespace diffkern
