// Device-generic parts of the COI / K-norm / energies ops (argument checks, gamma policy, small SPD
// solves, exact COI): ATen calls only, so CUDA launchers share them. It lives in cpu/ because
// setup.py compiles csrc/ops.cpp and csrc/cpu/*.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../checks.h"
#include "../energies.h"

namespace leakycuda {

namespace {

int64_t batch_numel(c10::IntArrayRef batch) {
  int64_t B = 1;
  for (int64_t s : batch) B *= s;
  return B;
}

void check_gamma_arg(const c10::optional<at::Tensor>& gamma, double gamma0, c10::IntArrayRef batch,
                     const at::Tensor& ref, const char* ref_name) {
  if (gamma.has_value()) {
    const at::Tensor& g = *gamma;
    TORCH_CHECK(at::isFloatingType(g.scalar_type()),
                "gamma must be a floating tensor (one ridge per batch entry), got ", g.scalar_type());
    CHECK_DEVICE(g, "gamma", ref, "X");
    TORCH_CHECK(g.numel() == 1 || g.sizes() == batch, "gamma must be one value or one per batch entry of ",
                ref_name, ", i.e. of shape ", shape_str(batch), ", got shape ", shape_str(g.sizes()));
  } else {
    TORCH_CHECK(std::isfinite(gamma0) && gamma0 > 0.0,
                "gamma0 must be finite and > 0 when gamma is None (gamma = gamma0 * ||sigma(X)||_op^2), got ",
                gamma0, "; for the exact COI (gamma = 0) use cost_of_identity_exact");
  }
}

KNormDims dims_of(const at::Tensor& X, const char* name, bool bias) {
  TORCH_CHECK(X.dim() >= 2, name, " must be [..., N, w] (samples x width, with optional leading batch dims), got shape ",
              shape_str(X.sizes()));
  const int64_t N = X.size(-2), w = X.size(-1);
  TORCH_CHECK(w >= 1, name, " must be [..., N, w] with width w >= 1, got shape ", shape_str(X.sizes()));
  return {batch_numel(X.sizes().slice(0, X.dim() - 2)), N, w, w + (bias ? 1 : 0), w};
}

}  // namespace

KNormDims check_coi_args(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0,
                         bool bias, bool allow_half) {
  check_float(X, "X", allow_half);
  const KNormDims d = dims_of(X, "X", bias);
  check_gamma_arg(gamma, gamma0, X.sizes().slice(0, X.dim() - 2), X, "X");
  return d;
}

KNormDims check_knorm_args(const at::Tensor& M, const at::Tensor& X,
                           const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                           bool allow_half) {
  check_float(X, "X", allow_half);
  CHECK_DTYPE(M, "M", X, "X");
  CHECK_DEVICE(M, "M", X, "X");
  KNormDims d = dims_of(X, "X", bias);
  TORCH_CHECK(M.dim() == X.dim() && M.sizes().slice(0, M.dim() - 1) == X.sizes().slice(0, X.dim() - 1),
              "M must be [..., N, m] with the leading dims and N of X ", shape_str(X.sizes()),
              " (the K-norm is taken in the sample space of X), got ", shape_str(M.sizes()));
  d.m = M.size(-1);
  check_gamma_arg(gamma, gamma0, X.sizes().slice(0, X.dim() - 2), X, "X");
  return d;
}

KNormDims check_energies_args(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                              bool allow_half) {
  check_float(xs, "xs", allow_half);
  CHECK_DIM(xs, "xs", 3, "[L+1, N, w] (every representation X_0..X_L of one batch)");
  TORCH_CHECK(xs.size(0) >= 1 && xs.size(2) >= 1,
              "xs must be [L+1, N, w] with L+1 >= 1 representations and width w >= 1, got ",
              shape_str(xs.sizes()));
  const int64_t L = xs.size(0) - 1, N = xs.size(1), w = xs.size(2);
  TORCH_CHECK(at::isFloatingType(rho.scalar_type()), "rho must be a floating tensor [L], got ",
              rho.scalar_type());
  CHECK_DEVICE(rho, "rho", xs, "xs");
  CHECK_SHAPE(rho, "rho", "[L], one step per layer (xs holds L+1 representations)", L);
  CHECK_FINITE(Lt, "Lt");
  if (rho.numel() > 0) {
    const at::Tensor r = rho.detach().to(at::kCPU, at::kDouble).contiguous();
    const double* p = r.data_ptr<double>();
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(std::isfinite(p[l]) && p[l] > 0.0, "rho must hold finite steps rho_l > 0 (D_l = (X_l - X_{l-1})/rho_l), got rho[",
                  l, "] = ", p[l]);
    }
  }
  if (gamma.has_value()) {
    TORCH_CHECK(gamma->numel() == 1 || gamma->sizes() == c10::IntArrayRef({L}),
                "gamma must be one value or one per layer, [L] = ", shape_str({L}), ", got shape ",
                shape_str(gamma->sizes()));
    TORCH_CHECK(at::isFloatingType(gamma->scalar_type()), "gamma must be a floating tensor, got ",
                gamma->scalar_type());
    CHECK_DEVICE((*gamma), "gamma", xs, "xs");
  } else {
    check_gamma_arg(gamma, gamma0, {L}, xs, "xs");
  }
  return {L, N, w, w + (bias ? 1 : 0), w};
}

void check_saved_z(const at::Tensor& Z, const at::Tensor& gamma, const KNormDims& d,
                   const at::Tensor& ref, const char* ref_name, int64_t blocks) {
  TORCH_CHECK(Z.scalar_type() == at::kDouble && gamma.scalar_type() == at::kDouble,
              "Z and gamma must be the float64 tensors the forward returned, got ", Z.scalar_type(), " and ",
              gamma.scalar_type());
  TORCH_CHECK(Z.device() == ref.device() && gamma.device() == ref.device(), "Z and gamma must be on the device of ",
              ref_name, " (", ref.device(), "), got ", Z.device(), " and ", gamma.device());
  TORCH_CHECK(Z.numel() == d.B * d.p * d.m * blocks && Z.size(-2) == d.p && Z.size(-1) == d.m * blocks,
              "Z must be the forward's [..., p, m] = [..., ", d.p, ", ", d.m * blocks, "] solve, got ",
              shape_str(Z.sizes()));
  TORCH_CHECK(gamma.numel() == d.B, "gamma must be the forward's gamma_used with ", d.B,
              " entries, got shape ", shape_str(gamma.sizes()));
}

void check_gamma_values(const at::Tensor& gamma) {
  const at::Tensor g = gamma.detach().to(at::kCPU, at::kDouble).contiguous().reshape(-1);
  const double* p = g.data_ptr<double>();
  for (int64_t i = 0; i < g.numel(); ++i) {
    TORCH_CHECK(std::isfinite(p[i]) && p[i] > 0.0, "gamma must be finite and > 0, got gamma[", i, "] = ", p[i],
                "; for the exact COI (gamma = 0) use cost_of_identity_exact (gamma=None in the Python API)");
  }
}

at::Tensor resolve_gamma(const c10::optional<at::Tensor>& gamma, double gamma0, const at::Tensor& G,
                         int64_t B) {
  const auto opt = G.options().dtype(at::kDouble);
  if (gamma.has_value()) {
    // A fresh tensor: an op output must not alias its input gamma.
    return at::empty({B}, opt).copy_(gamma->detach().reshape(-1).expand({B}));
  }
  const int64_t n = G.size(-1);
  if (n == 0 || B == 0) return at::zeros({B}, opt);
  at::Tensor lmax;
  if (G.is_cpu()) {
    // One eigvalsh per entry in parallel: batched LAPACK calls oversubscribe the threads on CPU.
    lmax = at::empty({B}, opt);
    double* out = lmax.data_ptr<double>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) out[b] = at::linalg_eigvalsh(G[b]).select(0, n - 1).item<double>();
    });
  } else {
    lmax = at::linalg_eigvalsh(G).select(-1, n - 1);
  }
  // Rounding can leave a tiny negative top eigenvalue for an all-zero S.
  return lmax.clamp_min(0.0).mul(gamma0);
}

namespace {

// Z_b = A_b^{-1} R_b by an eigendecomposition, eigenvalues clamped from below at floor_b.
void solve_spd_eigh(const at::Tensor& A, const at::Tensor& R, const at::Tensor& floor, at::Tensor Z) {
  auto [ev, V] = at::linalg_eigh(A);
  ev = at::maximum(ev, floor.unsqueeze(-1));
  Z.copy_(at::matmul(V, at::matmul(V.transpose(-1, -2), R).div(ev.unsqueeze(-1))));
}

}  // namespace

at::Tensor solve_spd(const at::Tensor& A, const at::Tensor& R, const at::Tensor& floor) {
  if (A.size(0) == 0 || A.size(-1) == 0) return at::zeros(R.sizes(), R.options());
  if (A.is_cpu()) {
    // One small factorisation and solve per entry in parallel: batched LAPACK calls oversubscribe
    // the threads on CPU (10x slower on 2 cores).
    at::Tensor Z = at::empty(R.sizes(), R.options());
    at::parallel_for(0, A.size(0), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        auto [Lc, info] = at::linalg_cholesky_ex(A[b], /*upper=*/false, /*check_errors=*/false);
        if (info.item<int>() == 0) {
          Z[b].copy_(at::cholesky_solve(R[b], Lc, /*upper=*/false));
        } else {
          solve_spd_eigh(A[b], R[b], floor[b], Z[b]);
        }
      }
    });
    return Z;
  }
  auto [Lc, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  at::Tensor Z = at::cholesky_solve(R, Lc, /*upper=*/false).contiguous();
  const at::Tensor bad = (info != 0).nonzero().reshape(-1).cpu();
  if (bad.numel() > 0) {
    const at::Tensor idx = bad.to(A.device());
    at::Tensor Zb = at::empty({bad.numel(), R.size(1), R.size(2)}, R.options());
    solve_spd_eigh(A.index_select(0, idx), R.index_select(0, idx), floor.index_select(0, idx), Zb);
    Z.index_copy_(0, idx, Zb);
  }
  return Z;
}

namespace {

// Exact COI of the batch entries in X64 [b, N, w] (float64): see cost_of_identity_exact.
void exact_entries(const at::Tensor& X64, bool bias, double rc, at::Tensor coi, at::Tensor res,
                   at::Tensor rank) {
  const int64_t N = X64.size(1);
  if (N == 0) {
    coi.zero_(), res.zero_(), rank.zero_();
    return;
  }
  at::Tensor S = at::relu(X64);
  if (bias) S = at::cat({S, at::ones_like(X64.narrow(2, 0, 1))}, 2);
  auto [U, sv, Vh] = at::linalg_svd(S, /*full_matrices=*/false);
  const at::Tensor keep = sv > sv.narrow(1, 0, 1).mul(rc);  // sv sorted in descending order
  const at::Tensor inv2 = at::where(keep, sv.square().reciprocal(), at::zeros_like(sv));
  at::Tensor Y = at::bmm(U.transpose(1, 2), X64);                   // [b, k, w] = U^T X
  coi.copy_(Y.square().sum(2).mul(inv2).sum(1));                      // ||S^+ X||^2 = sum_i ||u_i^T X||^2 / s_i^2
  Y = Y.mul(keep.unsqueeze(2).to(Y.scalar_type()));
  res.copy_(at::linalg_vector_norm(X64 - at::bmm(U, Y), 2, {1, 2}));  // ||X - U_r U_r^T X||_F, directly
  rank.copy_(keep.sum(1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_exact(const at::Tensor& X,
                                                                      c10::optional<double> rcond,
                                                                      bool bias) {
  check_float(X, "X", /*allow_half=*/true);
  const KNormDims d = dims_of(X, "X", bias);
  const double eps = X.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                     : X.scalar_type() == at::kFloat ? double(std::numeric_limits<float>::epsilon())
                     : X.scalar_type() == at::kHalf ? 9.765625e-4 : 7.8125e-3;
  const double rc = rcond.has_value() ? *rcond : double(std::max(d.N, d.p)) * eps;
  TORCH_CHECK(std::isfinite(rc) && rc >= 0.0, "rcond must be finite and >= 0 (relative singular-value cutoff), got ", rc);
  const auto batch = X.sizes().slice(0, X.dim() - 2);
  const at::Tensor X64 = X.detach().reshape({d.B, d.N, d.w}).to(at::kDouble);
  const auto opt = X64.options();
  at::Tensor coi = at::empty({d.B}, opt), res = at::empty({d.B}, opt);
  at::Tensor rank = at::empty({d.B}, opt.dtype(at::kLong));
  if (X64.is_cpu()) {
    // One SVD per entry in parallel (batched LAPACK calls oversubscribe the threads on CPU).
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      exact_entries(X64.narrow(0, b0, b1 - b0), bias, rc, coi.narrow(0, b0, b1 - b0),
                    res.narrow(0, b0, b1 - b0), rank.narrow(0, b0, b1 - b0));
    });
  } else if (d.B > 0) {
    exact_entries(X64, bias, rc, coi, res, rank);
  }
  return {coi.to(X.scalar_type()).reshape(batch), res.to(X.scalar_type()).reshape(batch), rank.reshape(batch)};
}

}  // namespace leakycuda
