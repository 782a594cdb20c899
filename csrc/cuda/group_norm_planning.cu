// CUDA group_norm: host-side planning (which plan, vector width, block and grid sizes, workspace)
// and the entry points of group_norm.h. The plans' kernels live in group_norm_resident.cu,
// group_norm_split.cu and group_norm_channels_last_rows.cu (overview: group_norm_common.cuh).
#include "group_norm.h"
#include "group_norm_common.cuh"

namespace diffkern {
namespace cuda {
namespace gn {
namespace {

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
  const int occ = rows_occupancy(a.dtype, static_cast<int>(threads), TRmax * row_bytes + scratch);
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

}  // namespace
}  // namespace gn

using gn::Params;
using gn::Plan;
using gn::ceil_div;
using gn::elem_size;
using gn::make_divider;
using gn::make_plan;
using gn::use_cl;

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
  p.act = args.activation;
  p.svec = (args.S % pl.vec) == 0;
  p.rl_Cv = pl.rows ? static_cast<int>(args.C / pl.vec) : 0;
  p.rl_R = pl.rl_R;
  p.rl_TR = pl.rl_TR;
  p.rl_RB = pl.rl_RB;
  p.rl_Nw = pl.rl_Nw;
  p.rl_waves = pl.rl_waves;
  p.rl_tile_bytes = pl.rl_tile_bytes;

  if (pl.rows) return launch_rows(pl, p, args.dtype, stream);
  if (pl.resident) return launch_resident(pl, p, args.dtype, use_cl(args), stream);
  return launch_split(pl, p, args.dtype, use_cl(args), stream);
}

}  // namespace cuda
}  // namespace diffkern

