// Device-generic parts of the COI / K-norm / energies ops, shared by the CPU kernels, the
// device-generic implementation and the CUDA launcher: the gamma policy, small SPD solves, the output
// conventions (gamma = 0, Lt = 0) and the exact COI. ATen calls only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "../energies.h"

namespace leakycuda {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// sign(t) * inf where t != 0, t itself where t is 0 or NaN: the limit of t / gamma as gamma -> 0+.
at::Tensor signed_inf(const at::Tensor& t) {
  return at::where(t.gt(0.0), at::full_like(t, kInf), at::where(t.lt(0.0), at::full_like(t, -kInf), t));
}

}  // namespace

namespace {

bool env_is_1(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace

bool cpu_aten_energies() { return env_is_1("LEAKYCUDA_CPU_ATEN_ENERGIES"); }

bool cuda_aten_energies() { return env_is_1("LEAKYCUDA_CUDA_ATEN_ENERGIES"); }

at::Tensor sigma_of(const at::Tensor& X, bool bias, bool relu) {
  const at::Tensor S = relu ? at::relu(X) : X;
  return bias ? at::cat({S, at::ones_like(X.narrow(-1, 0, 1))}, -1) : S;
}

at::Tensor given_gamma(const at::Tensor& gamma, int64_t B, const at::Device& device) {
  // A fresh tensor: an op output must not alias its input gamma.
  return at::empty({B}, at::TensorOptions().dtype(at::kDouble).device(device))
      .copy_(gamma.detach().reshape(-1).expand({B}));
}

at::Tensor gamma_policy(const at::Tensor& G, double gamma0) {
  const int64_t B = G.size(0), n = G.size(-1);
  if (B == 0 || n == 0) return at::zeros({B}, G.options());
  const at::Tensor finite = at::isfinite(G).flatten(1).all(1);
  const at::Tensor lmax = at::linalg_eigvalsh(at::where(finite.view({B, 1, 1}), G, at::zeros({}, G.options())))
                              .select(-1, n - 1);
  // Rounding can leave a tiny negative top eigenvalue for an all-zero S.
  return at::where(finite, lmax.clamp_min(0.0), at::full({}, kNaN, G.options())).mul(gamma0);
}

at::Tensor solve_spd(const at::Tensor& A, const at::Tensor& R, const at::Tensor& floor) {
  const int64_t B = A.size(0), n = A.size(-1);
  if (B == 0 || n == 0) return at::zeros(R.sizes(), R.options());
  const at::Tensor finite = at::isfinite(A).flatten(1).all(1).view({B, 1, 1});
  const at::Tensor As = at::where(finite, A, at::eye(n, A.options()));
  auto [Lc, info] = at::linalg_cholesky_ex(As, /*upper=*/false, /*check_errors=*/false);
  at::Tensor Z = at::cholesky_solve(R, Lc, /*upper=*/false);
  const at::Tensor bad = info.ne(0).nonzero().reshape(-1);
  if (bad.numel() > 0) {
    // Factorisation failed (rounding made A numerically indefinite): eigendecomposition with the
    // eigenvalues clamped at gamma, A's true lower bound.
    auto [ev, V] = at::linalg_eigh(As.index_select(0, bad));
    ev = at::maximum(ev, floor.index_select(0, bad).unsqueeze(-1));
    const at::Tensor Rb = R.index_select(0, bad);
    Z.index_copy_(0, bad, at::matmul(V, at::matmul(V.transpose(-1, -2), Rb).div(ev.unsqueeze(-1))));
  }
  return at::where(finite, Z, at::full({}, kNaN, Z.options())).contiguous();
}

at::Tensor finish_knorm_values(const at::Tensor& v, const at::Tensor& gamma) {
  return at::where(gamma.eq(0.0).unsqueeze(1), signed_inf(v), v);
}

std::array<at::Tensor, 5> energies_from_values(const at::Tensor& v, const at::Tensor& gamma, double Lt) {
  const at::Tensor v0 = v.select(1, 0), v1 = v.select(1, 1), dead = gamma.eq(0.0);
  if (Lt != 0.0) {
    // Where gamma = 0 every K-norm is ||.||^2 / 0: each output is the sign of its 1/gamma
    // coefficient times inf (0 where the coefficient vanishes).
    const at::Tensor ke = v1 / (2.0 * Lt), pot = v0 * (-0.5 * Lt);
    std::array<at::Tensor, 5> out = {v0, ke, pot, ke + pot, v0 - v1 / (Lt * Lt)};
    for (auto& t : out) t = at::where(dead, signed_inf(t), t);
    return out;
  }
  // Lt = 0: KE = ||D||^2 / (2 Lt) is +inf unless D = 0, the potential -(Lt/2) COI vanishes, and
  // -2H/Lt = COI - ||D||^2 / Lt^2 is -inf unless D = 0 (then COI).
  const at::Tensor coi = at::where(dead, signed_inf(v0), v0), ke = signed_inf(v1);
  const at::Tensor pot = at::where(at::isnan(coi), coi, at::zeros_like(coi));
  const at::Tensor rank = at::where(v1.gt(0.0), at::full_like(v1, -kInf), at::where(v1.eq(0.0), coi, v1));
  return {coi, ke, pot, ke, rank};
}

at::Tensor energies_coef(const std::array<at::Tensor, 5>& grads, double Lt) {
  std::array<at::Tensor, 5> g;
  for (int i = 0; i < 5; ++i) g[i] = grads[i].detach().to(at::kDouble).reshape(-1);
  const at::Tensor &gc = g[0], &gk = g[1], &gp = g[2], &gh = g[3], &gr = g[4];
  if (Lt != 0.0) {
    return at::stack({gc - (gp + gh) * (0.5 * Lt) + gr, (gk + gh) / (2.0 * Lt) - gr / (Lt * Lt)}, 1);
  }
  const at::Tensor used = gk.ne(0.0).logical_or(gh.ne(0.0)).logical_or(gr.ne(0.0)).nonzero();
  TORCH_CHECK(used.numel() == 0,
              "energies: at Lt = 0 the kinetic energy, Hamiltonian and rank estimate are not differentiable "
              "(they divide by Lt); only coi and potential have gradients there (layer ",
              used.numel() ? used[0][0].item<int64_t>() + 1 : 0, ")");
  return at::stack({gc, at::zeros_like(gc)}, 1);
}

namespace {

// Exact COI of the batch entries in X64 [b, N, w] (float64): see cost_of_identity_exact.
void exact_entries(const at::Tensor& X64, bool bias, bool relu, double rc, at::Tensor coi, at::Tensor res,
                   at::Tensor rank) {
  const int64_t b = X64.size(0), N = X64.size(1);
  if (N == 0) {
    coi.zero_(), res.zero_(), rank.zero_();
    return;
  }
  const at::Tensor S = sigma_of(X64, bias, relu);
  // The SVD cannot take a non-finite S: those entries get NaN (and rank -1) after a stand-in SVD.
  const at::Tensor finite = at::isfinite(S).flatten(1).all(1);
  auto [U, sv, Vh] = at::linalg_svd(at::where(finite.view({b, 1, 1}), S, at::zeros({}, S.options())),
                                    /*full_matrices=*/false);
  const at::Tensor keep = sv > sv.narrow(1, 0, 1).mul(rc);  // sv sorted in descending order
  const at::Tensor inv2 = at::where(keep, sv.square().reciprocal(), at::zeros_like(sv));
  at::Tensor Y = at::bmm(U.transpose(1, 2), X64);  // [b, k, w] = U^T X
  const at::Tensor nan = at::full({}, kNaN, X64.options());
  coi.copy_(at::where(finite, Y.square().sum(2).mul(inv2).sum(1), nan));  // ||S^+ X||^2 = sum_i ||u_i^T X||^2 / s_i^2
  Y = Y.mul(keep.unsqueeze(2).to(Y.scalar_type()));
  res.copy_(at::where(finite, at::linalg_vector_norm(X64 - at::bmm(U, Y), 2, {1, 2}), nan));  // ||X - U_r U_r^T X||_F
  rank.copy_(at::where(finite, keep.sum(1), at::full({}, -1, rank.options())));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_exact(const at::Tensor& X,
                                                                      c10::optional<double> rcond,
                                                                      bool bias,
                                                                      c10::string_view activation) {
  const SymKNormDims sd = check_exact_args_symint(X, rcond, bias, activation);
  const KNormDims d{sd.B.expect_int(), sd.N.expect_int(), sd.w.expect_int(), sd.p.expect_int(), sd.m.expect_int(),
                    sd.relu};
  const auto dt = X.scalar_type();
  const double eps = dt == at::kDouble ? std::numeric_limits<double>::epsilon()
                     : dt == at::kFloat ? double(std::numeric_limits<float>::epsilon())
                     : dt == at::kHalf ? 9.765625e-4 : 7.8125e-3;
  const double rc = rcond.has_value() ? *rcond : double(std::max(d.N, d.p)) * eps;
  const auto batch = X.sizes().slice(0, X.dim() - 2);
  const at::Tensor X64 = X.detach().reshape({d.B, d.N, d.w}).to(at::kDouble);
  const auto opt = X64.options();
  at::Tensor coi = at::empty({d.B}, opt), res = at::empty({d.B}, opt);
  at::Tensor rank = at::empty({d.B}, opt.dtype(at::kLong));
  if (X64.is_cpu() && !cpu_aten_energies()) {
    // One SVD per entry in parallel (batched LAPACK calls oversubscribe the threads on CPU).
    RECORD_FUNCTION("leakycuda::cpu::cost_of_identity_exact", std::vector<c10::IValue>());
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1) {
      exact_entries(X64.narrow(0, b0, b1 - b0), bias, d.relu, rc, coi.narrow(0, b0, b1 - b0),
                    res.narrow(0, b0, b1 - b0), rank.narrow(0, b0, b1 - b0));
    });
  } else if (d.B > 0) {
    RECORD_FUNCTION("leakycuda::generic::cost_of_identity_exact", std::vector<c10::IValue>());
    exact_entries(X64, bias, d.relu, rc, coi, res, rank);
  }
  return {coi.to(X.scalar_type()).reshape(batch), res.to(X.scalar_type()).reshape(batch), rank.reshape(batch)};
}

}  // namespace leakycuda
