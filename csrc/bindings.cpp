// The one place that exposes compiled ops to Python (module diffkern._C).
// Every entry point re-validates its inputs (a Python ValueError/TypeError naming the argument,
// never a crash): the Python layer checks first, this is the last line of defence.
//
// Error messages are built with std::to_string and string concatenation, never with iostreams
// (c10::str, TORCH_CHECK's formatting). On the H200 image (torch 2.11 built with gcc-toolset-13,
// this module with Ubuntu's g++ 13.3) formatting an integer through an ostringstream created in this
// module crashed the process (seen 2026-11-26, narrowed down with benchmarks/gpu_probe_checks.py:
// throwing worked, `c10::str("...", int64)` did not), most likely two libstdc++ locale-facet copies.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <type_traits>

#include "cpu/group_norm.h"
#include "cpu/dynamic_threshold.h"
#include "cpu/guided_step.h"
#include "cpu/sampler_update.h"
#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/group_norm.h"
#include "cuda/dynamic_threshold.h"
#include "cuda/guided_step.h"
#include "cuda/sampler_update.h"
#endif

namespace diffkern {
namespace {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
inline void append(std::string& s, T v) { s += std::to_string(v); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
inline void append(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <typename... Ts>
std::string message(const Ts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

#define DK_CHECK(cond, exc, ...) \
  do {                           \
    if (!(cond)) throw exc(message(__VA_ARGS__)); \
  } while (0)
#define DK_CHECK_VALUE(cond, ...) DK_CHECK(cond, pybind11::value_error, __VA_ARGS__)
#define DK_CHECK_TYPE(cond, ...) DK_CHECK(cond, pybind11::type_error, __VA_ARGS__)

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: DK_CHECK_TYPE(false, "group_norm: x must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

const void* check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                        at::IntArrayRef shape) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& p = *t;
  DK_CHECK_TYPE(p.scalar_type() == x.scalar_type(), "group_norm: ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", p.scalar_type());
  DK_CHECK_VALUE(p.device() == x.device(), "group_norm: ", name, " must be on x's device ", x.device(),
              ", got ", p.device());
  DK_CHECK_VALUE(p.sizes() == shape, "group_norm: ", name, " must have shape ", shape, ", got ", p.sizes());
  DK_CHECK_VALUE(p.is_contiguous(), "group_norm: ", name, " must be contiguous");
  return p.data_ptr();
}

// Returns (y, mean, rstd). x is contiguous or channels-last-like (stride of C is 1 and the spatial
// dims flatten to one stride of C); anything else is made contiguous by the Python layer.
std::vector<at::Tensor> group_norm_forward(const at::Tensor& x, int64_t num_groups,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& scale,
                                           const std::optional<at::Tensor>& shift, double eps,
                                           int64_t activation, const std::optional<at::Tensor>& out) {
  DK_CHECK_VALUE(x.dim() >= 2, "group_norm: x must have at least 2 dims (N, C, ...), got ", x.dim());
  const int64_t N = x.size(0), C = x.size(1);
  DK_CHECK_VALUE(num_groups > 0, "group_norm: num_groups must be positive, got ", num_groups);
  DK_CHECK_VALUE(C % num_groups == 0, "group_norm: num_channels ", C, " must be divisible by num_groups ",
              num_groups);
  DK_CHECK_VALUE(scale.has_value() == shift.has_value(), "group_norm: scale and shift must be given together");
  DK_CHECK_VALUE(eps >= 0, "group_norm: eps must be >= 0, got ", eps);
  DK_CHECK_VALUE(activation >= 0 && activation <= 3,
                 "group_norm: activation must be 0 (none), 1 (silu), 2 (gelu) or 3 (gelu_tanh), got ", activation);
  GroupNormArgs a;
  a.dtype = to_dtype(x.scalar_type());
  a.weight = check_param(weight, "weight", x, {C});
  a.bias = check_param(bias, "bias", x, {C});
  a.scale = check_param(scale, "scale", x, {N, C});
  a.shift = check_param(shift, "shift", x, {N, C});

  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  const bool contiguous = x.is_contiguous();
  bool channels_last = false;
  if (!contiguous) {
    // channels-last-like: C innermost, spatial dims row-major outside it, N outermost
    int64_t expected = C;
    bool ok = x.stride(1) == 1 || C == 1;
    for (int64_t d = x.dim() - 1; ok && d >= 2; --d) {
      ok = x.size(d) == 1 || x.stride(d) == expected;
      expected *= x.size(d);
    }
    ok = ok && (N <= 1 || x.stride(0) == C * S);
    DK_CHECK_VALUE(ok, "group_norm: x must be contiguous or channels_last, got strides ", x.strides());
    channels_last = true;
  }
  at::Tensor y;
  if (out.has_value()) {
    y = *out;
    DK_CHECK_VALUE(y.scalar_type() == x.scalar_type() && y.device() == x.device() && y.sizes() == x.sizes() &&
                    y.strides() == x.strides(),
                "group_norm: out must match x's dtype, device, shape and strides");
  } else {
    y = at::empty_strided(x.sizes(), x.strides(), x.options());
  }
  auto stats_opts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, num_groups}, stats_opts);
  at::Tensor rstd = at::empty({N, num_groups}, stats_opts);
  if (x.numel() == 0) return {y, mean.fill_(0), rstd.fill_(0)};

  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.N = N; a.C = C; a.S = S; a.G = num_groups;
  a.channels_last = channels_last;
  a.stride_n = C * S;
  a.stride_c = channels_last ? 1 : S;
  a.stride_s = channels_last ? C : 1;
  a.eps = static_cast<float>(eps);
  a.activation = static_cast<int>(activation);

  if (x.device().is_cpu()) {
    cpu::group_norm_forward(a);
  } else if (x.device().is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t ws_elems = cuda::group_norm_workspace_elems(a, num_sms);
    at::Tensor ws = at::empty({std::max<int64_t>(ws_elems, 1)}, stats_opts);
    cudaError_t err = cuda::group_norm_forward(a, ws.data_ptr<float>(), num_sms,
                                               at::cuda::getCurrentCUDAStream());
    DK_CHECK(err == cudaSuccess, std::runtime_error, "group_norm: CUDA kernel failed: ", cudaGetErrorString(err));
#else
    DK_CHECK_VALUE(false, "group_norm: diffkern._C was built without CUDA kernels");
#endif
  } else {
    DK_CHECK_VALUE(false, "group_norm: unsupported device ", x.device());
  }
  return {y, mean, rstd};
}

// dynamic_threshold: returns (y, thresholds (B,) float32). x is (B, ...) contiguous; see
// diffkern/ops/dynamic_threshold.py for the semantics. apply=false computes the thresholds only
// (y is returned empty): guided_step's statistics pass needs nothing else.
std::vector<at::Tensor> dynamic_threshold_forward(const at::Tensor& x, double percentile,
                                                  std::optional<double> max_value,
                                                  const std::optional<at::Tensor>& out, bool apply) {
  DK_CHECK_VALUE(x.dim() >= 1, "dynamic_threshold: x must have at least 1 dim (B, ...), got ", x.dim());
  DK_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "dynamic_threshold: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  DK_CHECK_VALUE(x.is_contiguous(), "dynamic_threshold: x must be contiguous");
  DK_CHECK_VALUE(percentile >= 0.0 && percentile <= 1.0, "dynamic_threshold: percentile must be in [0, 1], got ",
                 percentile);
  DK_CHECK_VALUE(!max_value.has_value() || *max_value >= 1.0,
                 "dynamic_threshold: max_value must be >= 1 or None, got ", max_value.value_or(0.0));
  const int64_t B = x.size(0);
  const int64_t n = B == 0 ? 0 : x.numel() / B;
  at::Tensor y;
  if (!apply) {
    DK_CHECK_VALUE(!out.has_value(), "dynamic_threshold: out must be None when apply is false");
    y = at::empty({0}, x.options());
  } else if (out.has_value()) {
    y = *out;
    DK_CHECK_VALUE(y.scalar_type() == x.scalar_type() && y.device() == x.device() && y.sizes() == x.sizes() &&
                       y.is_contiguous(),
                   "dynamic_threshold: out must be contiguous and match x's dtype, device and shape");
  } else {
    y = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  at::Tensor thresholds = at::empty({B}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, thresholds.fill_(1.0)};
  DynamicThresholdArgs a;
  a.x = x.data_ptr();
  a.y = apply ? y.data_ptr() : nullptr;
  a.thresholds = thresholds.data_ptr<float>();
  a.dtype = x.scalar_type() == at::kFloat ? DTDType::kFloat32
            : x.scalar_type() == at::kHalf ? DTDType::kFloat16 : DTDType::kBFloat16;
  a.B = B;
  a.n = n;
  a.percentile = percentile;
  a.has_max = max_value.has_value();
  a.max_value = max_value.value_or(0.0);
  if (x.device().is_cpu()) {
    cpu::dynamic_threshold_forward(a);
  } else if (x.device().is_cuda()) {
#ifdef WITH_CUDA
    DK_CHECK_VALUE(n < (int64_t{1} << 32), "dynamic_threshold: at most 2^32 - 1 elements per sample on CUDA, got ", n);
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor ws = at::empty({cuda::dynamic_threshold_workspace_bytes(B)}, x.options().dtype(at::kByte));
    cudaError_t err = cuda::dynamic_threshold_forward(a, ws.data_ptr(), at::cuda::getCurrentCUDAStream());
    DK_CHECK(err == cudaSuccess, std::runtime_error, "dynamic_threshold: CUDA kernel failed: ",
             cudaGetErrorString(err));
#else
    DK_CHECK_VALUE(false, "dynamic_threshold: diffkern._C was built without CUDA kernels");
#endif
  } else {
    DK_CHECK_VALUE(false, "dynamic_threshold: unsupported device ", x.device());
  }
  return {y, thresholds};
}

// guided_step: one pass of the CPU or CUDA kernel into preallocated outputs (the Python layer plans the
// passes: with abs_out only |unclipped x0| is written, for the dynamic-threshold statistics).
DType guided_step_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: DK_CHECK_TYPE(false, "guided_step: sample must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

void guided_step_check(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                       at::IntArrayRef shape) {
  DK_CHECK_TYPE(t.scalar_type() == dtype, "guided_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
  DK_CHECK_VALUE(t.device() == x.device(), "guided_step: ", name, " must be on sample's device ", x.device(),
                 ", got ", t.device());
  DK_CHECK_VALUE(t.sizes() == shape, "guided_step: ", name, " must have shape ", shape, ", got ", t.sizes());
  DK_CHECK_VALUE(t.is_contiguous(), "guided_step: ", name, " must be contiguous");
}

void guided_step_forward(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& u,
                         const std::optional<at::Tensor>& noise, const at::Tensor& coeffs,
                         const at::Tensor& prev, const at::Tensor& x0,
                         const std::optional<at::Tensor>& thresholds, const std::optional<at::Tensor>& abs_out,
                         int64_t pred, int64_t clip, bool learned, double guidance_scale, double clip_range,
                         std::optional<int64_t> seed, int64_t offset, bool eps_from_clipped) {
  DK_CHECK_VALUE(x.dim() >= 2, "guided_step: sample must be (B, C, *spatial), got ", x.dim(), " dims");
  DK_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), "guided_step: sample must be a CPU or CUDA tensor, got ",
                 x.device());
  DK_CHECK_VALUE(pred >= 0 && pred <= 2, "guided_step: prediction_type code must be 0, 1 or 2, got ", pred);
  DK_CHECK_VALUE(clip >= 0 && clip <= 2, "guided_step: clip code must be 0, 1 or 2, got ", clip);
  const auto dt = x.scalar_type();
  GuidedStepArgs a;
  a.dtype = guided_step_dtype(dt);
  const int64_t B = x.size(0), C = x.size(1);
  DK_CHECK_VALUE(x.is_contiguous(), "guided_step: sample must be contiguous");
  std::vector<int64_t> m_shape(x.sizes().begin(), x.sizes().end());
  m_shape[1] = learned ? 2 * C : C;
  guided_step_check(m, "model_output", x, dt, m_shape);
  if (u.has_value()) guided_step_check(*u, "uncond_output", x, dt, m_shape);
  if (noise.has_value()) guided_step_check(*noise, "noise", x, dt, x.sizes());
  guided_step_check(prev, "prev", x, dt, x.sizes());
  guided_step_check(x0, "x0", x, dt, x.sizes());
  guided_step_check(coeffs, "coeffs", x, at::kFloat, {B, learned ? 8 : 6});
  const int64_t N = B > 0 ? x.numel() / B : 0;
  DK_CHECK_VALUE(!(seed.has_value() && noise.has_value()), "guided_step: give noise or seed, not both");
  DK_CHECK_VALUE(!seed.has_value() || *seed >= 0, "guided_step: seed must be >= 0, got ", seed.value_or(0));
  DK_CHECK_VALUE(offset >= 0, "guided_step: offset must be >= 0, got ", offset);
  if (abs_out.has_value()) {
    guided_step_check(*abs_out, "abs_out", x, at::kFloat, {B, N});
  } else if (clip == 2) {
    DK_CHECK_VALUE(thresholds.has_value(), "guided_step: clip='dynamic' needs thresholds (or abs_out)");
    guided_step_check(*thresholds, "thresholds", x, at::kFloat, {B});
    a.thresholds = thresholds->data_ptr<float>();
  }
  if (x.numel() == 0) return;
  a.x = x.data_ptr();
  a.m = m.data_ptr();
  a.u = u.has_value() ? u->data_ptr() : nullptr;
  a.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  a.coeffs = coeffs.data_ptr<float>();
  a.prev = prev.data_ptr();
  a.x0 = x0.data_ptr();
  a.abs_out = abs_out.has_value() ? abs_out->data_ptr<float>() : nullptr;
  a.B = B; a.N = N; a.M_stride = learned ? 2 * N : N; a.K = learned ? 8 : 6;
  a.pred = static_cast<int>(pred);
  a.clip = static_cast<int>(clip);
  a.learned = learned;
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.clip_range = static_cast<float>(clip_range);
  a.eps_from_clipped = eps_from_clipped;
  a.seeded = seed.has_value();
  a.seed = static_cast<uint64_t>(seed.value_or(0));
  a.offset = static_cast<uint64_t>(offset);
  if (x.device().is_cpu()) {
    cpu::guided_step_forward(a);
    return;
  }
#ifdef WITH_CUDA
  DK_CHECK_VALUE(B <= 65535, "guided_step: at most 65535 samples per call on CUDA, got ", B);
  c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = cuda::guided_step_forward(a, at::cuda::getCurrentCUDAStream());
  DK_CHECK(err == cudaSuccess, std::runtime_error, "guided_step: CUDA kernel failed: ", cudaGetErrorString(err));
#else
  DK_CHECK_VALUE(false, "guided_step: diffkern._C was built without CUDA kernels");
#endif
}

// sampler_update: one pass of the CPU or CUDA kernel into preallocated outputs (the Python layer plans the
// passes: with abs_out only |unclipped d| is written, for the dynamic-threshold statistics).
void sampler_update_check(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                          at::IntArrayRef shape) {
  DK_CHECK_TYPE(t.scalar_type() == dtype, "sampler_update: ", name, " must be ", dtype, ", got ", t.scalar_type());
  DK_CHECK_VALUE(t.device() == x.device(), "sampler_update: ", name, " must be on sample's device ", x.device(),
                 ", got ", t.device());
  DK_CHECK_VALUE(t.sizes() == shape, "sampler_update: ", name, " must have shape ", shape, ", got ", t.sizes());
  DK_CHECK_VALUE(t.is_contiguous(), "sampler_update: ", name, " must be contiguous");
}

void sampler_update_forward(const at::Tensor& x, const at::Tensor& m, const std::optional<at::Tensor>& u,
                            const std::optional<at::Tensor>& noise, const std::vector<at::Tensor>& history,
                            const at::Tensor& coeffs, const at::Tensor& out, const at::Tensor& d,
                            const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& thresholds,
                            const std::optional<at::Tensor>& abs_out, int64_t clip, double guidance_scale,
                            double clip_range) {
  DK_CHECK_VALUE(x.dim() >= 1, "sampler_update: sample must be (B, *), got a 0-d tensor");
  DK_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(),
                 "sampler_update: sample must be a CPU or CUDA tensor, got ", x.device());
  DK_CHECK_VALUE(clip >= 0 && clip <= 2, "sampler_update: clip code must be 0, 1 or 2, got ", clip);
  const auto H = static_cast<int64_t>(history.size());
  DK_CHECK_VALUE(H <= kSamplerMaxHistory, "sampler_update: at most ", kSamplerMaxHistory,
                 " history tensors, got ", H);
  const auto dt = x.scalar_type();
  DK_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                "sampler_update: sample must be float32, float16 or bfloat16, got ", dt);
  DK_CHECK_VALUE(x.is_contiguous(), "sampler_update: sample must be contiguous");
  SamplerUpdateArgs a;
  a.dtype = dt == at::kFloat ? DType::kFloat32 : dt == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const int64_t B = x.size(0);
  const int64_t N = B > 0 ? x.numel() / B : 0;
  const int64_t K = 5 + H + (aux.has_value() ? 2 + H : 0);
  sampler_update_check(m, "model_output", x, dt, x.sizes());
  if (u.has_value()) sampler_update_check(*u, "uncond_output", x, dt, x.sizes());
  if (noise.has_value()) sampler_update_check(*noise, "noise", x, dt, x.sizes());
  for (int64_t j = 0; j < H; ++j) sampler_update_check(history[j], "history", x, dt, x.sizes());
  sampler_update_check(out, "out", x, dt, x.sizes());
  sampler_update_check(d, "d", x, dt, x.sizes());
  if (aux.has_value()) sampler_update_check(*aux, "aux", x, dt, x.sizes());
  sampler_update_check(coeffs, "coeffs", x, at::kFloat, {B, K});
  if (abs_out.has_value()) {
    sampler_update_check(*abs_out, "abs_out", x, at::kFloat, {B, N});
  } else if (clip == 2) {
    DK_CHECK_VALUE(thresholds.has_value(), "sampler_update: clip='dynamic' needs thresholds (or abs_out)");
    sampler_update_check(*thresholds, "thresholds", x, at::kFloat, {B});
    a.thresholds = thresholds->data_ptr<float>();
  }
  if (x.numel() == 0) return;
  a.x = x.data_ptr();
  a.m = m.data_ptr();
  a.u = u.has_value() ? u->data_ptr() : nullptr;
  a.noise = noise.has_value() ? noise->data_ptr() : nullptr;
  for (int64_t j = 0; j < H; ++j) a.h[j] = history[j].data_ptr();
  a.H = static_cast<int>(H);
  a.coeffs = coeffs.data_ptr<float>();
  a.out = out.data_ptr();
  a.d = d.data_ptr();
  a.aux = aux.has_value() ? aux->data_ptr() : nullptr;
  a.abs_out = abs_out.has_value() ? abs_out->data_ptr<float>() : nullptr;
  a.B = B; a.N = N; a.K = K;
  a.clip = static_cast<int>(clip);
  a.guidance_scale = static_cast<float>(guidance_scale);
  a.clip_range = static_cast<float>(clip_range);
  if (x.device().is_cpu()) {
    cpu::sampler_update_forward(a);
    return;
  }
#ifdef WITH_CUDA
  DK_CHECK_VALUE(B <= 65535, "sampler_update: at most 65535 samples per call on CUDA, got ", B);
  c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = cuda::sampler_update_forward(a, at::cuda::getCurrentCUDAStream());
  DK_CHECK(err == cudaSuccess, std::runtime_error, "sampler_update: CUDA kernel failed: ",
           cudaGetErrorString(err));
#else
  DK_CHECK_VALUE(false, "sampler_update: diffkern._C was built without CUDA kernels");
#endif
}

// Throws one kind of C++ exception (0: pybind11::value_error, 1: c10::Error via TORCH_CHECK,
// 2: std::runtime_error), for diagnosing exception translation on a given build.
void debug_throw(int kind) {
  if (kind == 0) throw pybind11::value_error("debug_throw: pybind11::value_error");
  if (kind == 1) TORCH_CHECK(false, "debug_throw: c10::Error");
  throw std::runtime_error("debug_throw: std::runtime_error");
}

// Formats an int64 into an error message the way the checks do and throws it (diagnostics for
// the crash described at the top of this file).
void debug_throw_formatted(int64_t v) { DK_CHECK_VALUE(false, "debug_throw_formatted: ", v); }

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["cuda"] = false;
  d["cuda_version"] = pybind11::none();
#endif
#ifdef DIFFKERN_CUDA_ARCHS
  d["cuda_archs"] = std::string(DIFFKERN_CUDA_ARCHS);
#else
  d["cuda_archs"] = pybind11::none();
#endif
  d["cpu_capability"] = std::string(cpu::group_norm_capability());
  d["torch_version"] = std::string(TORCH_VERSION);
  return d;
}

}  // namespace
}  // namespace diffkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffkern compiled kernels (CPU always, CUDA when built with it)";
  m.def("group_norm_forward", &diffkern::group_norm_forward, "GroupNorm (+scale-shift) (+SiLU / GELU) forward; activation 0 none, 1 silu, 2 gelu, 3 gelu_tanh",
        pybind11::arg("x"), pybind11::arg("num_groups"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("scale"), pybind11::arg("shift"), pybind11::arg("eps"), pybind11::arg("activation"),
        pybind11::arg("out") = pybind11::none());
  m.def("dynamic_threshold_forward", &diffkern::dynamic_threshold_forward,
        "dynamic thresholding by radix select, returns (y, thresholds)", pybind11::arg("x"),
        pybind11::arg("percentile"), pybind11::arg("max_value") = pybind11::none(),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("apply") = true);
  m.def("guided_step_forward", &diffkern::guided_step_forward,
        "guided_step: one pass into preallocated outputs (abs_out: the dynamic-threshold statistics pass)",
        pybind11::arg("x"), pybind11::arg("m"), pybind11::arg("u"), pybind11::arg("noise"), pybind11::arg("coeffs"),
        pybind11::arg("prev"), pybind11::arg("x0"), pybind11::arg("thresholds"), pybind11::arg("abs_out"),
        pybind11::arg("pred"), pybind11::arg("clip"), pybind11::arg("learned"), pybind11::arg("guidance_scale"),
        pybind11::arg("clip_range"), pybind11::arg("seed") = pybind11::none(), pybind11::arg("offset") = 0,
        pybind11::arg("eps_from_clipped") = true);
  m.def("sampler_update_forward", &diffkern::sampler_update_forward,
        "sampler_update: one pass into preallocated outputs (abs_out: the dynamic-threshold statistics pass)",
        pybind11::arg("x"), pybind11::arg("m"), pybind11::arg("u"), pybind11::arg("noise"),
        pybind11::arg("history"), pybind11::arg("coeffs"), pybind11::arg("out"), pybind11::arg("d"),
        pybind11::arg("aux"), pybind11::arg("thresholds"), pybind11::arg("abs_out"), pybind11::arg("clip"),
        pybind11::arg("guidance_scale"), pybind11::arg("clip_range"));
  m.def("build_info", &diffkern::build_info, "How this extension was built");
  m.def("_debug_throw", &diffkern::debug_throw, "Throw a C++ exception of the given kind (diagnostics)");
  m.def("_debug_throw_formatted", &diffkern::debug_throw_formatted, "Throw a formatted message (diagnostics)");
}
