// Named argument checks shared by every op (CPU, CUDA and Meta): each message says what was given
// and what is expected. Shapes are compared as symbolic sizes, so the same check runs on real
// tensors and, under tracing (FakeTensor, torch.compile with dynamic shapes), on fake ones.
// Shape and value problems raise ValueError, dtype problems TypeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>
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

// Whether a size condition holds; on symbolic sizes it guards (or, for data-dependent sizes,
// defers a runtime assert), like the shape checks of ATen's own meta functions.
inline bool holds(const c10::SymBool& b) { return b.expect_true(__FILE__, __LINE__); }

inline bool sizes_equal(c10::SymIntArrayRef got, c10::SymIntArrayRef want) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); ++i)
    if (!holds(got[i].sym_eq(want[i]))) return false;
  return true;
}

// `name` must be a floating tensor of a dtype the kernels support (float32, float64; half types on CUDA).
inline void check_float(const at::Tensor& t, const char* name, bool allow_half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_half && (dt == at::kHalf || dt == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, name, " must be a floating tensor (float32 or float64",
                   allow_half ? ", float16 or bfloat16" : "", " on ", t.device().type(),
                   "), got ", dt);
}

}  // namespace leakycuda

// `t` must have exactly the sizes in `expected` (braced list of ints or SymInts); `hint` explains
// the expected layout.
#define CHECK_SHAPE(t, name, hint, ...)                                                           \
  do {                                                                                            \
    const std::vector<c10::SymInt> expected_ = {__VA_ARGS__};                                     \
    TORCH_CHECK_VALUE(leakycuda::sizes_equal((t).sym_sizes(), expected_), name " must be ", hint, \
                      " = ", c10::SymIntArrayRef(expected_), ", got ", (t).sym_sizes());          \
  } while (0)

// `t` must have `n` dimensions.
#define CHECK_DIM(t, name, n, hint)                                                                   \
  TORCH_CHECK_VALUE((t).dim() == (n), name " must be ", hint, " (", n, " dimensions), got shape ", \
                    (t).sym_sizes())

// `t` must live on the same device as `ref`.
#define CHECK_DEVICE(t, name, ref, ref_name)                                                         \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name " must be on the same device as " ref_name \
                    " (", (ref).device(), "), got ", (t).device())

// `t` must have the same dtype as `ref`.
#define CHECK_DTYPE(t, name, ref, ref_name)                                                \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(),                               \
                   name " must have the same dtype as " ref_name " (", (ref).scalar_type(), \
                   "), got ", (t).scalar_type())

// A scalar hyper-parameter must be finite.
#define CHECK_FINITE(x, name) \
  TORCH_CHECK_VALUE(std::isfinite(x), name " must be finite, got ", x)
