// Declarations shared by the Cost-of-Identity / K-norm / energies ops: argument checks, the
// device-generic small solves (ATen only, so a CUDA launcher can call them between its own fused
// passes), and the CPU kernels.
//
// CUDA slot-in: register TORCH_LIBRARY_IMPL(leakycuda, CUDA) for cost_of_identity(_backward),
// k_norm2(_backward) and energies(_backward) with the same output contract as the CPU kernels
// (values in the input dtype; gamma_used and Z float64, Z = (S^T S + gamma I)^{-1} S^T M laid out
// [B, p, blocks * m]); reuse the check_* functions, resolve_gamma and solve_spd (batched on CUDA).
// cost_of_identity_exact is CompositeExplicitAutograd and already runs on CUDA.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace leakycuda {

// Sizes of a K-norm problem: B batch entries (the flattened leading dims) of [N, w]
// representations; S = sigma(X) has p = w+1 columns (bias) or p = w (bias=False); the K-norm is
// taken of m columns per block (m = w for the COI).
struct KNormDims {
  int64_t B, N, w, p, m;
};

// --- argument checks (cpu/energies_common.cpp); messages name the argument, the given and the expected ---

// X [..., N, w]; gamma None (then gamma0 > 0 is the policy) or [...] / one value, same device.
KNormDims check_coi_args(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0,
                         bool bias, bool allow_half);
// M [..., N, m] with the leading dims and N of X [..., N, w].
KNormDims check_knorm_args(const at::Tensor& M, const at::Tensor& X,
                           const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                           bool allow_half);
// xs [L+1, N, w], rho [L] (> 0, read on the host), Lt finite; B = L.
KNormDims check_energies_args(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                              bool allow_half);
// Checks of the tensors a backward op gets back from its forward (Z [..., p, m], gamma [...]).
void check_saved_z(const at::Tensor& Z, const at::Tensor& gamma, const KNormDims& d,
                   const at::Tensor& ref, const char* ref_name, int64_t blocks);

// Every gamma finite and > 0 (reads gamma on the host: skip it while capturing a CUDA graph).
void check_gamma_values(const at::Tensor& gamma);

// --- device-generic pieces (ATen ops only; cpu/energies_common.cpp) ---

// The gamma each batch entry uses, float64 [B]: the given gamma (broadcast), or gamma0 * lambda_max(G_b)
// from the Grams G [B, n, n] (float64; S^T S or S S^T, which share their top eigenvalue).
at::Tensor resolve_gamma(const c10::optional<at::Tensor>& gamma, double gamma0, const at::Tensor& G,
                         int64_t B);

// Z = A^{-1} R for symmetric positive definite A [B, n, n] (float64), R [B, n, k]: batched
// Cholesky; entries whose factorisation fails fall back to an eigendecomposition with the
// eigenvalues clamped from below at floor[b] (A's true smallest eigenvalue is >= gamma_b).
at::Tensor solve_spd(const at::Tensor& A, const at::Tensor& R, const at::Tensor& floor);

// Exact COI ||S^+ X||_F^2 with singular values of S below rcond * sigma_max dropped (rcond None:
// max(N, p) * eps(X.dtype)); returns (coi [...], residual ||S S^+ X - X||_F [...], rank of S [...] int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_exact(const at::Tensor& X,
                                                                      c10::optional<double> rcond,
                                                                      bool bias);

// --- CPU kernels (cpu/energies.cpp). Every internal sum, Gram and solve runs in float64. ---

// (coi [...] in X's dtype, gamma_used [...] float64, Z [..., p, w] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_cpu(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias);
at::Tensor cost_of_identity_backward_cpu(const at::Tensor& grad, const at::Tensor& X,
                                         const at::Tensor& Z, const at::Tensor& gamma, bool bias);

// (value [...] in M's dtype, gamma_used [...] float64, Z [..., p, m] float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_cpu(const at::Tensor& M, const at::Tensor& X,
                                                           const c10::optional<at::Tensor>& gamma,
                                                           double gamma0, bool bias);
std::tuple<at::Tensor, at::Tensor> k_norm2_backward_cpu(const at::Tensor& grad, const at::Tensor& M,
                                                        const at::Tensor& X, const at::Tensor& Z,
                                                        const at::Tensor& gamma, bool bias);

// (coi, kinetic, potential, hamiltonian, rank_estimate [L] in xs's dtype, gamma_used [L] float64,
//  Z [L, p, 2w] float64 = the solves of X_{l-1} and D_l, kept for backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_cpu(const at::Tensor& xs, const at::Tensor& rho, double Lt,
             const c10::optional<at::Tensor>& gamma, double gamma0, bool bias);
// (dxs [L+1, N, w], drho [L]).
std::tuple<at::Tensor, at::Tensor> energies_backward_cpu(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias);

}  // namespace leakycuda
