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
#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/group_norm.h"
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
                                           bool silu, const std::optional<at::Tensor>& out) {
  DK_CHECK_VALUE(x.dim() >= 2, "group_norm: x must have at least 2 dims (N, C, ...), got ", x.dim());
  const int64_t N = x.size(0), C = x.size(1);
  DK_CHECK_VALUE(num_groups > 0, "group_norm: num_groups must be positive, got ", num_groups);
  DK_CHECK_VALUE(C % num_groups == 0, "group_norm: num_channels ", C, " must be divisible by num_groups ",
              num_groups);
  DK_CHECK_VALUE(scale.has_value() == shift.has_value(), "group_norm: scale and shift must be given together");
  DK_CHECK_VALUE(eps >= 0, "group_norm: eps must be >= 0, got ", eps);
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
  a.silu = silu;

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
  m.def("group_norm_forward", &diffkern::group_norm_forward, "GroupNorm (+scale-shift) (+SiLU) forward",
        pybind11::arg("x"), pybind11::arg("num_groups"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("scale"), pybind11::arg("shift"), pybind11::arg("eps"), pybind11::arg("silu"),
        pybind11::arg("out") = pybind11::none());
  m.def("build_info", &diffkern::build_info, "How this extension was built");
  m.def("_debug_throw", &diffkern::debug_throw, "Throw a C++ exception of the given kind (diagnostics)");
  m.def("_debug_throw_formatted", &diffkern::debug_throw_formatted, "Throw a formatted message (diagnostics)");
}
