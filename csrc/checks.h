// Named argument checks shared by every op (CPU and CUDA): each message says what was given and what is expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace leakycuda {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "]";
  return s.str();
}

// `name` must be a floating tensor of a dtype the kernels support (float32, float64; half types on CUDA).
inline void check_float(const at::Tensor& t, const char* name, bool allow_half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_half && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK(ok, name, " must be a floating tensor (float32 or float64",
              allow_half ? ", float16 or bfloat16" : "", " on ", t.device().type(),
              "), got ", dt);
}

}  // namespace leakycuda

// `t` must have exactly the sizes in `expected` (braced list); `hint` explains the expected layout.
#define CHECK_SHAPE(t, name, hint, ...)                                                         \
  do {                                                                                          \
    const std::vector<int64_t> expected_ = {__VA_ARGS__};                                       \
    TORCH_CHECK((t).sizes() == c10::IntArrayRef(expected_), name " must be ", hint, " = ",      \
                leakycuda::shape_str(expected_), ", got ", leakycuda::shape_str((t).sizes())); \
  } while (0)

// `t` must have `n` dimensions.
#define CHECK_DIM(t, name, n, hint)                                                              \
  TORCH_CHECK((t).dim() == (n), name " must be ", hint, " (", n, " dimensions), got shape ",     \
              leakycuda::shape_str((t).sizes()))

// `t` must live on the same device as `ref`.
#define CHECK_DEVICE(t, name, ref, ref_name)                                                     \
  TORCH_CHECK((t).device() == (ref).device(), name " must be on the same device as " ref_name \
              " (", (ref).device(), "), got ", (t).device())

// `t` must have the same dtype as `ref`.
#define CHECK_DTYPE(t, name, ref, ref_name)                                                      \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(),                                          \
              name " must have the same dtype as " ref_name " (", (ref).scalar_type(),          \
              "), got ", (t).scalar_type())

// A scalar hyper-parameter must be finite.
#define CHECK_FINITE(x, name) \
  TORCH_CHECK(std::isfinite(x), name " must be finite, got ", x)
