// Declarations shared by the leaky-stack op's schema file, its CPU kernels and its CUDA launchers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace leakycuda {

// sigma(X) = [act(X), 1]: kRelu is relu(X) ("relu"), kLinear is X itself ("linear").
enum class Activation { kRelu, kLinear };

// Sizes of a stack: B models (B = 1 and models = false for one model, i.e. a 3-D W), each with
// L layers of width w over a batch of N rows; act is the activation of sigma.
struct StackDims {
  int64_t B, L, N, w;
  Activation act;
  bool models;
};

// Number of representations the forward keeps for backward with checkpoint interval k:
// X_0, X_k, X_2k, ... up to X_{L-1}, i.e. ceil(L / k).
inline int64_t num_states(int64_t L, int64_t k) { return (L + k - 1) / k; }

// The activation named by the schema's `activation` string ("relu" or "linear"); ValueError otherwise.
Activation parse_activation(c10::string_view activation);

// Argument checks for leaky_stack; returns the sizes. One model: x0 [N, w], W [L, w, w+1], rho [L],
// model_Lt None. B models (W 4-D): x0 [B, N, w], W [B, L, w, w+1], rho [B, L], model_Lt None or a
// float64 [B] tensor on x0's device (per-model Lt, replacing Lt).
StackDims check_stack_args(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                           double Lt, int64_t checkpoint, c10::string_view activation,
                           const c10::optional<at::Tensor>& model_Lt, bool allow_half);

// Argument checks for leaky_stack_backward; grad is [N, w] (dC/dX_L) or [L+1, N, w] (dC/dX_l, all
// l), with a leading [B] for B models; states [S', N, w] (S' >= ceil(L/k)), [B, S', N, w] for B models.
StackDims check_stack_backward_args(const at::Tensor& grad, const at::Tensor& states,
                                    const at::Tensor& W, const at::Tensor& rho, double Lt,
                                    int64_t checkpoint, c10::string_view activation,
                                    const c10::optional<at::Tensor>& model_Lt, bool allow_half);

// Value check on the host: every rho_l finite and >= 0 (LeakyResNet warns about rho_l*Lt > 1).
// Reads rho on the CPU, so a CUDA caller must skip it while a CUDA graph is being captured.
void check_rho_values(const at::Tensor& rho);

// CPU implementations (csrc/cpu/leaky_stack.cpp).
std::tuple<at::Tensor, at::Tensor> leaky_stack_cpu(const at::Tensor& x0, const at::Tensor& W,
                                                   const at::Tensor& rho, double Lt,
                                                   bool return_all, int64_t checkpoint,
                                                   c10::string_view activation,
                                                   const c10::optional<at::Tensor>& model_Lt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cpu(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho,
    double Lt, int64_t checkpoint, c10::string_view activation,
    const c10::optional<at::Tensor>& model_Lt);

}  // namespace leakycuda
