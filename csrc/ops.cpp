// Every leakycuda op schema, the argument checks they share, and the device-independent one-layer op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#ifndef LEAKYCUDA_NO_PYTHON
#include <Python.h>
#endif

#include "checks.h"
#include "energies.h"
#include "leaky_stack.h"

#ifndef LEAKYCUDA_NO_PYTHON
// `import leakycuda._C` loads this library and so runs the TORCH_LIBRARY registrations below;
// the module itself is empty (no pybind).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace leakycuda {

namespace {

void check_common(const at::Tensor& x, const char* x_name, const at::Tensor& W,
                  const at::Tensor& rho, double Lt, bool allow_half) {
  check_float(x, x_name, allow_half);
  CHECK_DTYPE(W, "W", x, "x0");
  CHECK_DTYPE(rho, "rho", x, "x0");
  CHECK_DEVICE(W, "W", x, "x0");
  CHECK_DEVICE(rho, "rho", x, "x0");
  CHECK_FINITE(Lt, "Lt");
}

// model_Lt: None, or (B models only) a float64 [B] tensor on x's device.
void check_model_Lt(const c10::optional<at::Tensor>& model_Lt, const at::Tensor& x, const char* x_name,
                    bool models, int64_t B) {
  if (!model_Lt.has_value()) return;
  const at::Tensor& t = *model_Lt;
  TORCH_CHECK(models, "model_Lt (a per-model Lt) needs B models (a 4-D W [B, L, w, w+1]); with one "
              "model pass Lt alone, got model_Lt of shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kDouble, "model_Lt must be a float64 tensor [B], got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "model_Lt must be on the same device as ", x_name, " (",
              x.device(), "), got ", t.device());
  CHECK_SHAPE(t, "model_Lt", "[B], one Lt per model", B);
}

}  // namespace

Activation parse_activation(c10::string_view activation) {
  if (activation == "relu") return Activation::kRelu;
  if (activation == "linear") return Activation::kLinear;
  TORCH_CHECK(false, "activation must be \"relu\" or \"linear\", got \"", std::string(activation), "\"");
}

StackDims check_stack_args(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                           double Lt, int64_t checkpoint, c10::string_view activation,
                           const c10::optional<at::Tensor>& model_Lt, bool allow_half) {
  check_common(x0, "x0", W, rho, Lt, allow_half);
  const Activation act = parse_activation(activation);
  TORCH_CHECK(W.dim() == 3 || W.dim() == 4, "W must be [L, w, w+1] (one model) or [B, L, w, w+1] "
              "(B models), got shape ", shape_str(W.sizes()));
  const bool models = W.dim() == 4;
  if (models) {
    CHECK_DIM(x0, "x0", 3, "[B, N, w] (B models: W is 4-D)");
  } else {
    CHECK_DIM(x0, "x0", 2, "[N, w]");
  }
  const int64_t B = models ? x0.size(0) : 1, N = x0.size(-2), w = x0.size(-1), L = W.size(-3);
  TORCH_CHECK(w >= 1, "x0 must have width w >= 1, got ", shape_str(x0.sizes()));
  if (models) {
    CHECK_SHAPE(W, "W", "[B, L, w, w+1] with B, w from x0 [B, N, w]", B, L, w, w + 1);
    CHECK_SHAPE(rho, "rho", "[B, L], one step per layer of each model", B, L);
  } else {
    TORCH_CHECK(!(W.size(1) == w && W.size(2) == w), "W must be [L, w, w+1] = ",
                shape_str({L, w, w + 1}), ", got ", shape_str(W.sizes()),
                "; the last column is the bias (W_l = [V_l | b_l])");
    CHECK_SHAPE(W, "W", "[L, w, w+1] with w = x0.size(1)", L, w, w + 1);
    CHECK_SHAPE(rho, "rho", "[L], one step per layer of W", L);
  }
  check_model_Lt(model_Lt, x0, "x0", models, B);
  TORCH_CHECK(checkpoint >= 1, "checkpoint must be an interval k >= 1, got ", checkpoint);
  return {B, L, N, w, act, models};
}

StackDims check_stack_backward_args(const at::Tensor& grad, const at::Tensor& states,
                                    const at::Tensor& W, const at::Tensor& rho, double Lt,
                                    int64_t checkpoint, c10::string_view activation,
                                    const c10::optional<at::Tensor>& model_Lt, bool allow_half) {
  check_common(grad, "grad", W, rho, Lt, allow_half);
  const Activation act = parse_activation(activation);
  CHECK_DTYPE(states, "states", grad, "grad");
  CHECK_DEVICE(states, "states", grad, "grad");
  TORCH_CHECK(W.dim() == 3 || W.dim() == 4, "W must be [L, w, w+1] (one model) or [B, L, w, w+1] "
              "(B models), got shape ", shape_str(W.sizes()));
  const bool models = W.dim() == 4;
  const int64_t m = models ? 1 : 0;  // leading model dimension
  const int64_t B = models ? W.size(0) : 1, L = W.size(-3), w = W.size(-2);
  CHECK_DIM(states, "states", 3 + m, models ? "[B, S, N, w]" : "[S, N, w]");
  TORCH_CHECK(grad.dim() == 2 + m || grad.dim() == 3 + m, "grad must be ",
              models ? "[B, N, w] (of X_L) or [B, L+1, N, w]" : "[N, w] (of X_L) or [L+1, N, w]",
              " (of every X_l), got shape ", shape_str(grad.sizes()));
  const int64_t N = grad.size(-2);
  const bool per_layer = grad.dim() == 3 + m;
  std::vector<int64_t> gshape;
  if (models) gshape.push_back(B);
  if (per_layer) gshape.push_back(L + 1);
  gshape.insert(gshape.end(), {N, w});
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(gshape), "grad must be ",
              per_layer ? (models ? "[B, L+1, N, w]" : "[L+1, N, w]") : (models ? "[B, N, w]" : "[N, w]"),
              " = ", shape_str(gshape), ", got ", shape_str(grad.sizes()));
  if (models) {
    CHECK_SHAPE(W, "W", "[B, L, w, w+1]", B, L, w, w + 1);
    CHECK_SHAPE(rho, "rho", "[B, L]", B, L);
  } else {
    CHECK_SHAPE(W, "W", "[L, w, w+1]", L, w, w + 1);
    CHECK_SHAPE(rho, "rho", "[L]", L);
  }
  check_model_Lt(model_Lt, grad, "grad", models, B);
  TORCH_CHECK(checkpoint >= 1, "checkpoint must be an interval k >= 1, got ", checkpoint);
  const int64_t S = num_states(L, checkpoint);
  TORCH_CHECK((!models || states.size(0) == B) && states.size(m) >= S && states.size(m + 1) == N &&
                  states.size(m + 2) == w,
              "states must hold the ceil(L/k) = ", S, " saved representations [", models ? "B, " : "",
              S, "+, ", N, ", ", w, "] (checkpoint k = ", checkpoint, "), got ", shape_str(states.sizes()));
  return {B, L, N, w, act, models};
}

void check_rho_values(const at::Tensor& rho) {
  if (rho.numel() == 0) return;
  const at::Tensor r = rho.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = r.data_ptr<double>();
  for (int64_t l = 0; l < r.numel(); ++l) {
    TORCH_CHECK(std::isfinite(p[l]) && p[l] >= 0.0,
                "rho must hold finite steps rho_l >= 0, got rho[", l, "] = ", p[l]);
  }
}

namespace {

// One leaky residual layer as a one-layer stack; dispatches to the stack op of x's device.
at::Tensor leaky_layer(const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho, double Lt,
                       c10::string_view activation) {
  CHECK_DIM(x, "x", 2, "[N, w]");
  CHECK_DIM(W, "W", 2, "[w, w+1] (one layer's weight; the last column is the bias)");
  TORCH_CHECK(rho.numel() == 1 && rho.dim() <= 1, "rho must be a single step (a 0-d tensor), got shape ",
              shape_str(rho.sizes()));
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("leakycuda::leaky_stack", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, bool,
                                                                 int64_t, c10::string_view,
                                                                 const c10::optional<at::Tensor>&)>();
  return std::get<0>(op.call(x, W.unsqueeze(0), rho.reshape({1}), Lt, false, 1, activation, c10::nullopt));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_layer_backward(const at::Tensor& grad,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& W,
                                                                    const at::Tensor& rho,
                                                                    double Lt,
                                                                    c10::string_view activation) {
  CHECK_DIM(x, "x", 2, "[N, w]");
  CHECK_DIM(W, "W", 2, "[w, w+1]");
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("leakycuda::leaky_stack_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, int64_t, c10::string_view,
                           const c10::optional<at::Tensor>&)>();
  auto [dx, dW, drho] =
      op.call(grad, x.unsqueeze(0), W.unsqueeze(0), rho.reshape({1}), Lt, 1, activation, c10::nullopt);
  return {dx, dW.squeeze(0), drho.reshape(rho.sizes())};
}

}  // namespace

}  // namespace leakycuda

TORCH_LIBRARY(leakycuda, m) {
  // Whole stack: x0 [N,w], W [L,w,w+1], rho [L] -> (out, states); activation "relu" or "linear"
  // (sigma(X) = [relu(X), 1] or [X, 1]). out is [L+1,N,w] (every X_l) when return_all, else [N,w]
  // (X_L); states holds what backward needs: X_0, X_k, X_2k, ... (k = checkpoint), [ceil(L/k),N,w],
  // or [0,N,w] when return_all. B models (a 4-D W): x0 [B,N,w], W [B,L,w,w+1], rho [B,L], every
  // output with a leading [B]; model_Lt None (every model uses Lt) or a float64 [B] of per-model Lt.
  m.def("leaky_stack(Tensor x0, Tensor W, Tensor rho, float Lt, bool return_all, int checkpoint,"
        " str activation=\"relu\", Tensor? model_Lt=None) -> (Tensor, Tensor)");
  // grad: [N,w] of X_L or [L+1,N,w] of every X_l; states: the forward's states (or its [L+1,N,w]
  // output with checkpoint 1). Returns (dx0 [N,w], dW [L,w,w+1], drho [L]); leading [B] for B models.
  m.def("leaky_stack_backward(Tensor grad, Tensor states, Tensor W, Tensor rho, float Lt,"
        " int checkpoint, str activation=\"relu\", Tensor? model_Lt=None) -> (Tensor, Tensor, Tensor)");
  // One layer: x [N,w], W [w,w+1], rho 0-d -> [N,w].
  m.def("leaky_layer(Tensor x, Tensor W, Tensor rho, float Lt, str activation=\"relu\") -> Tensor");
  m.def("leaky_layer_backward(Tensor grad, Tensor x, Tensor W, Tensor rho, float Lt,"
        " str activation=\"relu\") -> (Tensor, Tensor, Tensor)");

  // --- Cost of Identity, K-norms and energies (csrc/energies.h); S = sigma(X) has p = w+1 columns
  // (bias) or p = w (bias=False); gamma is [...] or one value > 0, or None for gamma0 * ||S||_op^2.
  // COI_gamma of X [..., N, w] -> (coi [...], gamma_used [...] f64, Z [..., p, w] f64).
  m.def("cost_of_identity(Tensor X, Tensor? gamma, float gamma0, bool bias) -> (Tensor, Tensor, Tensor)");
  // grad [...] of coi; Z, gamma: the forward's. Returns dX [..., N, w] (gamma held fixed).
  m.def("cost_of_identity_backward(Tensor grad, Tensor X, Tensor Z, Tensor gamma, bool bias) -> Tensor");
  // Exact COI ||S^+ X||_F^2 (cutoff rcond * sigma_max; None: max(N, p) * eps) -> (coi, residual
  // ||S S^+ X - X||_F, rank of S int64), each [...]; not differentiable.
  m.def("cost_of_identity_exact(Tensor X, float? rcond, bool bias) -> (Tensor, Tensor, Tensor)");
  // ||M||^2_{K(X),gamma} for M [..., N, m] -> (value [...], gamma_used [...] f64, Z [..., p, m] f64).
  m.def("k_norm2(Tensor M, Tensor X, Tensor? gamma, float gamma0, bool bias) -> (Tensor, Tensor, Tensor)");
  // Returns (dM, dX) (gamma held fixed).
  m.def("k_norm2_backward(Tensor grad, Tensor M, Tensor X, Tensor Z, Tensor gamma, bool bias)"
        " -> (Tensor, Tensor)");
  // xs [L+1, N, w], rho [L]; per layer l (metric from X_{l-1}) -> (coi, kinetic, potential,
  // hamiltonian, rank_estimate [L], gamma_used [L] f64, Z [L, p, 2w] f64 kept for backward).
  m.def("energies(Tensor xs, Tensor rho, float Lt, Tensor? gamma, float gamma0, bool bias)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the five [L] outputs -> (dxs [L+1, N, w], drho [L]) (gamma held fixed).
  m.def("energies_backward(Tensor grad_coi, Tensor grad_kinetic, Tensor grad_potential,"
        " Tensor grad_hamiltonian, Tensor grad_rank, Tensor xs, Tensor rho, float Lt, Tensor Z,"
        " Tensor gamma, bool bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(leakycuda, CompositeExplicitAutograd, m) {
  m.impl("leaky_layer", &leakycuda::leaky_layer);
  m.impl("leaky_layer_backward", &leakycuda::leaky_layer_backward);
  // Device-generic (ATen SVD): serves CPU and CUDA alike.
  m.impl("cost_of_identity_exact", &leakycuda::cost_of_identity_exact);
}

TORCH_LIBRARY_IMPL(leakycuda, CPU, m) {
  m.impl("leaky_stack", &leakycuda::leaky_stack_cpu);
  m.impl("leaky_stack_backward", &leakycuda::leaky_stack_backward_cpu);
  // Cost of Identity, K-norms and energies (csrc/cpu/energies.cpp).
  m.impl("cost_of_identity", &leakycuda::cost_of_identity_cpu);
  m.impl("cost_of_identity_backward", &leakycuda::cost_of_identity_backward_cpu);
  m.impl("k_norm2", &leakycuda::k_norm2_cpu);
  m.impl("k_norm2_backward", &leakycuda::k_norm2_backward_cpu);
  m.impl("energies", &leakycuda::energies_cpu);
  m.impl("energies_backward", &leakycuda::energies_backward_cpu);
}
