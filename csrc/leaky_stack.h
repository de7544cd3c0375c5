// Declarations of the leaky-stack ops (leaky_stack, leaky_stack_backward, leaky_layer and its backward):
// their argument checks and Meta kernels (generic/leaky_stack_checks.cpp), the one-layer op
// (generic/leaky_layer.cpp), the CPU kernels (cpu/leaky_stack.cpp) and the CUDA entry points
// (cuda/leaky_stack.cu); ops.cpp registers them.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>
#include <type_traits>
#include <vector>

namespace leakycuda {

// sigma(X) = [act(X), 1]: kRelu is relu(X) ("relu"), kLinear is X itself ("linear").
enum class Activation { kRelu, kLinear };

// Calls f(std::integral_constant<Activation, act>{}), so that kernels can take the activation as a
// template parameter: visit_activation(d.act, [&](auto kAct) { kernel<decltype(kAct)::value>(...); }).
template <typename F>
decltype(auto) visit_activation(Activation act, F&& f) {
  if (act == Activation::kRelu) return f(std::integral_constant<Activation, Activation::kRelu>{});
  return f(std::integral_constant<Activation, Activation::kLinear>{});
}

// Sizes of a stack: B models (B = 1 and models = false for one model, i.e. a 3-D W), each with
// L layers of width w over a batch of N rows; act is the activation of sigma.
struct StackDims {
  int64_t B, L, N, w;
  Activation act;
  bool models;
};

// The same sizes as symbolic ints: what the checks return, so that one check serves the real
// kernels (concrete sizes) and the Meta kernels under tracing (symbolic sizes).
struct SymStackDims {
  c10::SymInt B, L, N, w;
  Activation act;
  bool models;
};

// Number of representations the forward keeps for backward with checkpoint interval k:
// X_0, X_k, X_2k, ... up to X_{L-1}, i.e. ceil(L / k). Int: int64_t or c10::SymInt.
template <typename Int>
Int num_states(const Int& L, int64_t k) {
  return (L + (k - 1)) / k;
}

// Empty (out, states) of leaky_stack with sizes d (StackDims or SymStackDims): out [N, w], or
// [L+1, N, w] when return_all; states [ceil(L/k), N, w], or [0, N, w] when return_all; each with a
// leading [B] for B models.
template <typename Dims>
std::tuple<at::Tensor, at::Tensor> empty_stack_outputs(const Dims& d, bool return_all, int64_t k,
                                                       const at::TensorOptions& options) {
  std::vector<c10::SymInt> out, states;
  if (d.models) out.push_back(d.B), states.push_back(d.B);
  if (return_all) out.push_back(d.L + 1);
  states.push_back(return_all ? decltype(d.L)(0) : num_states(d.L, k));
  for (auto* v : {&out, &states}) v->insert(v->end(), {d.N, d.w});
  return {at::empty_symint(out, options), at::empty_symint(states, options)};
}

// Empty (dx0, dW, drho) of leaky_stack_backward: x0's, W's and rho's shapes.
template <typename Dims>
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_stack_grads(const Dims& d,
                                                                 const at::TensorOptions& options) {
  std::vector<c10::SymInt> dx0, dW, drho;
  if (d.models) dx0.push_back(d.B), dW.push_back(d.B), drho.push_back(d.B);
  dx0.insert(dx0.end(), {d.N, d.w});
  dW.insert(dW.end(), {d.L, d.w, d.w + 1});
  drho.push_back(d.L);
  return {at::empty_symint(dx0, options), at::empty_symint(dW, options), at::empty_symint(drho, options)};
}

// The activation named by the schema's `activation` string ("relu" or "linear"); ValueError otherwise.
Activation parse_activation(c10::string_view activation);

// --- argument checks (generic/leaky_stack_checks.cpp) ---

// Argument checks for leaky_stack; returns the sizes. One model: x0 [N, w], W [L, w, w+1], rho [L],
// model_Lt None. B models (W 4-D): x0 [B, N, w], W [B, L, w, w+1], rho [B, L], model_Lt None or a
// float64 [B] tensor on x0's device (per-model Lt, replacing Lt).
// Shapes, dtypes, devices and scalar arguments only: the data-dependent checks (rho_l finite and
// >= 0, model_Lt finite) are the real kernels' (check_rho_values, check_model_Lt_values).
// Errors: ValueError (shape, value, device), TypeError (dtype).
StackDims check_stack_args(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                           double Lt, int64_t checkpoint, c10::string_view activation,
                           const c10::optional<at::Tensor>& model_Lt, bool allow_half);
SymStackDims check_stack_args_symint(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                                     double Lt, int64_t checkpoint, c10::string_view activation,
                                     const c10::optional<at::Tensor>& model_Lt, bool allow_half);

// Argument checks for leaky_stack_backward; grad is [N, w] (dC/dX_L) or [L+1, N, w] (dC/dX_l, all
// l), with a leading [B] for B models; states [S', N, w] (S' >= ceil(L/k)), [B, S', N, w] for B models.
StackDims check_stack_backward_args(const at::Tensor& grad, const at::Tensor& states,
                                    const at::Tensor& W, const at::Tensor& rho, double Lt,
                                    int64_t checkpoint, c10::string_view activation,
                                    const c10::optional<at::Tensor>& model_Lt, bool allow_half);
SymStackDims check_stack_backward_args_symint(const at::Tensor& grad, const at::Tensor& states,
                                              const at::Tensor& W, const at::Tensor& rho, double Lt,
                                              int64_t checkpoint, c10::string_view activation,
                                              const c10::optional<at::Tensor>& model_Lt,
                                              bool allow_half);

// Value checks on the host: every rho_l finite and >= 0 (LeakyResNet warns about rho_l*Lt > 1),
// every model_Lt finite. They read the values on the CPU, so a CUDA caller must skip them while a
// CUDA graph is being captured.
void check_rho_values(const at::Tensor& rho);
void check_model_Lt_values(const c10::optional<at::Tensor>& model_Lt);

// The one-layer op's check, in its own terms: x [N, w], W_l [w, w+1], rho_l a single step; grad (when
// not null) x's shape. Half types pass except on the CPU.
void check_layer_args(const at::Tensor* grad, const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho,
                      double Lt, c10::string_view activation);

// --- Meta kernels (generic/leaky_stack_checks.cpp): the checks on symbolic sizes, then empty outputs ---

std::tuple<at::Tensor, at::Tensor> leaky_stack_meta(const at::Tensor& x0, const at::Tensor& W,
                                                    const at::Tensor& rho, double Lt, bool return_all,
                                                    int64_t checkpoint, c10::string_view activation,
                                                    const c10::optional<at::Tensor>& model_Lt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_meta(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho, double Lt,
    int64_t checkpoint, c10::string_view activation, const c10::optional<at::Tensor>& model_Lt);

// --- the one-layer op (generic/leaky_layer.cpp): x [N, w], W [w, w+1], rho 0-d, run as a one-layer
// stack on x's device ---

at::Tensor leaky_layer(const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho, double Lt,
                       c10::string_view activation);
// (dx, dW, drho) of leaky_layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_layer_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& W, const at::Tensor& rho,
                                                                    double Lt, c10::string_view activation);

// --- CPU kernels (cpu/leaky_stack.cpp) ---
std::tuple<at::Tensor, at::Tensor> leaky_stack_cpu(const at::Tensor& x0, const at::Tensor& W,
                                                   const at::Tensor& rho, double Lt,
                                                   bool return_all, int64_t checkpoint,
                                                   c10::string_view activation,
                                                   const c10::optional<at::Tensor>& model_Lt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cpu(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho,
    double Lt, int64_t checkpoint, c10::string_view activation,
    const c10::optional<at::Tensor>& model_Lt);

// --- CUDA entry points (cuda/leaky_stack.cu; built with LEAKYCUDA_WITH_CUDA): the CPU kernels' contract,
// half types included ---

std::tuple<at::Tensor, at::Tensor> leaky_stack_cuda(const at::Tensor& x0, const at::Tensor& W,
                                                    const at::Tensor& rho, double Lt, bool return_all,
                                                    int64_t checkpoint, c10::string_view activation,
                                                    const c10::optional<at::Tensor>& model_Lt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cuda(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho, double Lt,
    int64_t checkpoint, c10::string_view activation, const c10::optional<at::Tensor>& model_Lt);

}  // namespace leakycuda
