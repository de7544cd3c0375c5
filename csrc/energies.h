// Declarations of the Cost-of-Identity / K-norm / energies ops: argument checks and Meta kernels, the
// device-generic pieces (ATen only), the device-generic implementation of every op, the CPU kernels and
// the CUDA entry points; ops.cpp registers them.
//
// Output contract of every implementation (CPU kernel, device-generic, fused CUDA): values in the input
// dtype; gamma_used and Z float64, Z = (S^T S + gamma I)^{-1} S^T M laid out [B, p, blocks * m].
// Non-finite inputs propagate as in leakycuda/reference.py: an entry whose Gram is not finite gets
// NaN for gamma (gamma0 policy) and Z, hence NaN values and gradients.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <c10/core/SymInt.h>

#include <array>
#include <tuple>

namespace leakycuda {

// Sizes of a K-norm problem: B batch entries (the flattened leading dims) of [N, w]
// representations; S = sigma(X) = [act(X), 1] has p = w+1 columns (bias) or p = w (bias=False),
// act = relu (relu = true, activation "relu") or the identity ("linear"); the K-norm is taken of m
// columns per block (m = w for the COI).
struct KNormDims {
  int64_t B, N, w, p, m;
  bool relu;
};

// The same sizes, possibly symbolic (under tracing).
struct SymKNormDims {
  c10::SymInt B, N, w, p, m;
  bool relu;
};

// Whether the schema's `activation` string is "relu" (true) or "linear" (false); ValueError otherwise.
bool energy_relu(c10::string_view activation);

// --- argument checks, one per op (generic/energies_checks.cpp): ValueError/TypeError naming the
// argument, the given and the expected. The *_symint checks (dtypes, devices, shapes, scalar
// arguments) run on symbolic sizes, in the kernels and in the Meta kernels alike; the others are what
// every kernel calls: the same on concrete sizes, plus the host-side value checks (gamma > 0 where a
// forward gets one, rho > 0), which tracing cannot do.

// X [..., N, w]; gamma None (then gamma0 > 0 is the policy) or [...] / one value, same device.
SymKNormDims check_coi_args_symint(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0,
                                   bool bias, c10::string_view activation);
// M [..., N, m] with the leading dims and N of X [..., N, w].
SymKNormDims check_knorm_args_symint(const at::Tensor& M, const at::Tensor& X,
                                     const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                                     c10::string_view activation);
// xs [L+1, N, w], rho [L], Lt finite; B = L.
SymKNormDims check_energies_args_symint(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                                        const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                                        c10::string_view activation);
// Backward ops: the forward's inputs, its Z [..., p, m * blocks] and gamma_used [...] (float64), and
// one gradient value per batch entry (per layer for the five energies outputs).
SymKNormDims check_coi_backward_args_symint(const at::Tensor& grad, const at::Tensor& X, const at::Tensor& Z,
                                            const at::Tensor& gamma, bool bias, c10::string_view activation);
SymKNormDims check_knorm_backward_args_symint(const at::Tensor& grad, const at::Tensor& M, const at::Tensor& X,
                                              const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                              c10::string_view activation);
SymKNormDims check_energies_backward_args_symint(const std::array<at::Tensor, 5>& grads, const at::Tensor& xs,
                                                 const at::Tensor& rho, double Lt, const at::Tensor& Z,
                                                 const at::Tensor& gamma, bool bias, c10::string_view activation);
// X [..., N, w] of any floating dtype; rcond None or finite >= 0.
SymKNormDims check_exact_args_symint(const at::Tensor& X, c10::optional<double> rcond, bool bias,
                                     c10::string_view activation);

KNormDims check_coi_args(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                         c10::string_view activation);
KNormDims check_knorm_args(const at::Tensor& M, const at::Tensor& X, const c10::optional<at::Tensor>& gamma,
                           double gamma0, bool bias, c10::string_view activation);
KNormDims check_energies_args(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                              c10::string_view activation);
KNormDims check_coi_backward_args(const at::Tensor& grad, const at::Tensor& X, const at::Tensor& Z,
                                  const at::Tensor& gamma, bool bias, c10::string_view activation);
KNormDims check_knorm_backward_args(const at::Tensor& grad, const at::Tensor& M, const at::Tensor& X,
                                    const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                    c10::string_view activation);
KNormDims check_energies_backward_args(const std::array<at::Tensor, 5>& grads, const at::Tensor& xs,
                                       const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma,
                                       bool bias, c10::string_view activation);

// Value checks on the host (skip them while capturing a CUDA graph): every gamma finite and > 0,
// every rho_l finite and > 0.
void check_gamma_values(const at::Tensor& gamma);
void check_step_values(const at::Tensor& rho);

// --- Meta kernels (generic/energies_checks.cpp): each op's *_symint check, then empty outputs of the
// kernels' shapes and dtypes (tracing, FakeTensor, torch.compile). Signatures as the CPU kernels below.

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_meta(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation);
at::Tensor cost_of_identity_backward_meta(const at::Tensor& grad, const at::Tensor& X, const at::Tensor& Z,
                                          const at::Tensor& gamma, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_exact_meta(const at::Tensor& X,
                                                                           c10::optional<double> rcond, bool bias,
                                                                           c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_meta(const at::Tensor& M, const at::Tensor& X,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> k_norm2_backward_meta(const at::Tensor& grad, const at::Tensor& M,
                                                         const at::Tensor& X, const at::Tensor& Z,
                                                         const at::Tensor& gamma, bool bias,
                                                         c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_meta(const at::Tensor& xs, const at::Tensor& rho, double Lt,
              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> energies_backward_meta(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias,
    c10::string_view activation);

// True when LEAKYCUDA_CPU_ATEN_ENERGIES=1 (read at every call): the CPU ops then run the
// device-generic implementation, the code CUDA falls back to, so CPU tests cover it.
bool cpu_aten_energies();
// True when LEAKYCUDA_CUDA_ATEN_ENERGIES=1 (read at every call): the CUDA ops skip the fused kernels and
// run the device-generic implementation (benchmarks compare the two on one GPU).
bool cuda_aten_energies();

// --- device-generic pieces (ATen ops only; generic/energies_common.cpp) ---

// sigma(X) = [act(X), 1] ([..., N, w+1]; act(X) alone without bias), act = relu (NaN stays NaN) or,
// with relu = false, the identity.
at::Tensor sigma_of(const at::Tensor& X, bool bias, bool relu);

// The given gamma as a fresh float64 [B] tensor on `device` (broadcast from one value or [B]).
at::Tensor given_gamma(const at::Tensor& gamma, int64_t B, const at::Device& device);

// gamma0 * lambda_max(G_b) per entry of the float64 Grams G [B, n, n] (S^T S or S S^T, which share
// their top eigenvalue): one batched eigvalsh; NaN where G_b is not finite.
at::Tensor gamma_policy(const at::Tensor& G, double gamma0);

// Z = A^{-1} R for symmetric positive definite A [B, n, n] (float64), R [B, n, k]: one batched
// Cholesky factorisation and solve; entries whose factorisation fails fall back to an
// eigendecomposition with the eigenvalues clamped from below at floor[b] (A's true smallest
// eigenvalue is >= gamma_b); Z_b is NaN where A_b is not finite.
at::Tensor solve_spd(const at::Tensor& A, const at::Tensor& R, const at::Tensor& floor);

// ||M||^2_{K,gamma} from the raw values v [B, blocks] (float64) and gamma [B]: where gamma = 0
// (the gamma0 policy met S = 0) the K-norm is ||M||^2 / 0, i.e. +inf, 0 where M = 0, NaN stays NaN.
at::Tensor finish_knorm_values(const at::Tensor& v, const at::Tensor& gamma);

// (coi, kinetic, potential, hamiltonian, rank_estimate), each [L] float64, from the raw values
// v [L, 2] (COI_gamma(X_{l-1}) and ||D_l||^2_K) and gamma [L], with the Lt = 0 and gamma = 0 conventions.
std::array<at::Tensor, 5> energies_from_values(const at::Tensor& v, const at::Tensor& gamma, double Lt);

// coef [L, 2] float64 = dLoss/d(COI_gamma(X_{l-1}), ||D_l||^2_K) from the gradients of the five
// outputs; at Lt = 0 only coi and potential are differentiable (an error names the first layer otherwise).
at::Tensor energies_coef(const std::array<at::Tensor, 5>& grads, double Lt);

// Exact COI ||S^+ X||_F^2 with singular values of S below rcond * sigma_max dropped (rcond None:
// max(N, p) * eps(X.dtype)); returns (coi [...], residual ||S S^+ X - X||_F [...], rank of S [...] int64).
// Where sigma(X) is not finite: coi and residual NaN, rank -1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_exact(const at::Tensor& X,
                                                                      c10::optional<double> rcond,
                                                                      bool bias,
                                                                      c10::string_view activation);

// --- device-generic implementation of every op (generic/energies_aten.cpp): batched float64 ATen
// ops only. It is what CUDA runs when no fused kernel applies, and what the CPU ops run under
// LEAKYCUDA_CPU_ATEN_ENERGIES=1. Same signatures and outputs as the CPU kernels below.

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_aten(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation);
at::Tensor cost_of_identity_backward_aten(const at::Tensor& grad, const at::Tensor& X,
                                          const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                          c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_aten(const at::Tensor& M, const at::Tensor& X,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> k_norm2_backward_aten(const at::Tensor& grad, const at::Tensor& M,
                                                         const at::Tensor& X, const at::Tensor& Z,
                                                         const at::Tensor& gamma, bool bias,
                                                         c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_aten(const at::Tensor& xs, const at::Tensor& rho, double Lt,
              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> energies_backward_aten(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias,
    c10::string_view activation);

// --- CPU kernels (cpu/energies.cpp). Every internal sum, Gram and solve runs in float64. ---

// (coi [...] in X's dtype, gamma_used [...] float64, Z [..., p, w] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_cpu(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation);
at::Tensor cost_of_identity_backward_cpu(const at::Tensor& grad, const at::Tensor& X,
                                         const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                         c10::string_view activation);

// (value [...] in M's dtype, gamma_used [...] float64, Z [..., p, m] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_cpu(const at::Tensor& M, const at::Tensor& X,
                                                           const c10::optional<at::Tensor>& gamma,
                                                           double gamma0, bool bias, c10::string_view activation);
// (dM, dX).
std::tuple<at::Tensor, at::Tensor> k_norm2_backward_cpu(const at::Tensor& grad, const at::Tensor& M,
                                                        const at::Tensor& X, const at::Tensor& Z,
                                                        const at::Tensor& gamma, bool bias,
                                                        c10::string_view activation);

// (coi, kinetic, potential, hamiltonian, rank_estimate [L] in xs's dtype, gamma_used [L] float64,
//  Z [L, p, 2w] float64 = the solves of X_{l-1} and D_l, kept for backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_cpu(const at::Tensor& xs, const at::Tensor& rho, double Lt,
             const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation);
// (dxs [L+1, N, w], drho [L]).
std::tuple<at::Tensor, at::Tensor> energies_backward_cpu(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias,
    c10::string_view activation);

// --- CUDA entry points (cuda/energies.cu; built with LEAKYCUDA_WITH_CUDA): the fused kernels where they
// apply, else the device-generic implementation. Signatures and outputs as the CPU kernels. ---

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_cuda(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation);
at::Tensor cost_of_identity_backward_cuda(const at::Tensor& grad, const at::Tensor& X,
                                          const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                          c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_cuda(const at::Tensor& M, const at::Tensor& X,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> k_norm2_backward_cuda(const at::Tensor& grad, const at::Tensor& M,
                                                         const at::Tensor& X, const at::Tensor& Z,
                                                         const at::Tensor& gamma, bool bias,
                                                         c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_cuda(const at::Tensor& xs, const at::Tensor& rho, double Lt,
              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> energies_backward_cuda(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias,
    c10::string_view activation);

}  // namespace leakycuda
