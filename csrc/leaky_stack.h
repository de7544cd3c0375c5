// Declarations shared by the leaky-stack op's schema file, its CPU kernels and its CUDA launchers.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace leakycuda {

// Sizes of a stack: L layers of width w over a batch of N rows.
struct StackDims {
  int64_t L, N, w;
};

// Number of representations the forward keeps for backward with checkpoint interval k:
// X_0, X_k, X_2k, ... up to X_{L-1}, i.e. ceil(L / k).
inline int64_t num_states(int64_t L, int64_t k) { return (L + k - 1) / k; }

// Argument checks for leaky_stack (x0 [N,w], W [L,w,w+1], rho [L]); returns the sizes.
StackDims check_stack_args(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                           double Lt, int64_t checkpoint, bool allow_half);

// Argument checks for leaky_stack_backward; grad is [N,w] (dC/dX_L) or [L+1,N,w] (dC/dX_l, all l).
StackDims check_stack_backward_args(const at::Tensor& grad, const at::Tensor& states,
                                    const at::Tensor& W, const at::Tensor& rho, double Lt,
                                    int64_t checkpoint, bool allow_half);

// Value check on the host: every rho_l finite and >= 0 (LeakyResNet warns about rho_l*Lt > 1).
// Reads rho on the CPU, so a CUDA caller must skip it while a CUDA graph is being captured.
void check_rho_values(const at::Tensor& rho);

// CPU implementations (csrc/cpu/leaky_stack.cpp).
std::tuple<at::Tensor, at::Tensor> leaky_stack_cpu(const at::Tensor& x0, const at::Tensor& W,
                                                   const at::Tensor& rho, double Lt,
                                                   bool return_all, int64_t checkpoint);
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cpu(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho,
    double Lt, int64_t checkpoint);

}  // namespace leakycuda
