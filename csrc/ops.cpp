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

// x, W and rho: floating, of one dtype and on one device; Lt finite. Names as the user knows them.
void check_operands(const at::Tensor& x, const char* x_name, const at::Tensor& W, const char* W_name,
                    const at::Tensor& rho, const char* rho_name, double Lt, bool allow_half) {
  check_float(x, x_name, allow_half);
  TORCH_CHECK_TYPE(W.scalar_type() == x.scalar_type(), W_name, " must have the same dtype as ", x_name,
                   " (", x.scalar_type(), "), got ", W.scalar_type());
  TORCH_CHECK_TYPE(rho.scalar_type() == x.scalar_type(), rho_name, " must have the same dtype as ",
                   x_name, " (", x.scalar_type(), "), got ", rho.scalar_type());
  TORCH_CHECK_VALUE(W.device() == x.device(), W_name, " must be on the same device as ", x_name, " (",
                    x.device(), "), got ", W.device());
  TORCH_CHECK_VALUE(rho.device() == x.device(), rho_name, " must be on the same device as ", x_name,
                    " (", x.device(), "), got ", rho.device());
  CHECK_FINITE(Lt, "Lt");
}

// W is [L, w, w+1] (one model) or [B, L, w, w+1] (B models): returns whether it holds B models.
bool check_W_rank(const at::Tensor& W) {
  TORCH_CHECK_VALUE(W.dim() == 3 || W.dim() == 4, "W must be [L, w, w+1] (one model) or [B, L, w, w+1] "
                    "(B models), got shape ", W.sym_sizes());
  return W.dim() == 4;
}

// W and rho against the sizes taken from x0 (or grad): [L, w, w+1] and [L], with a leading [B].
void check_W_rho(const at::Tensor& W, const at::Tensor& rho, const SymStackDims& d) {
  const c10::SymInt &B = d.B, &L = d.L, &w = d.w;
  if (d.models) {
    CHECK_SHAPE(W, "W", "[B, L, w, w+1] with B and w of x0 [B, N, w]", B, L, w, w + 1);
    CHECK_SHAPE(rho, "rho", "[B, L], one step per layer of each model", B, L);
    return;
  }
  const std::vector<c10::SymInt> want = {L, w, w + 1};
  if (!sizes_equal(W.sym_sizes(), want)) {
    const bool square = holds(W.sym_size(1).sym_eq(w)) && holds(W.sym_size(2).sym_eq(w));
    TORCH_CHECK_VALUE(!square, "W must be [L, w, w+1] = ", c10::SymIntArrayRef(want), ", got ",
                      W.sym_sizes(), "; the last column is the bias (W_l = [V_l | b_l])");
    TORCH_CHECK_VALUE(false, "W must be [L, w, w+1] with w = x0.size(1) = ", c10::SymIntArrayRef(want),
                      ", got ", W.sym_sizes());
  }
  CHECK_SHAPE(rho, "rho", "[L], one step per layer of W", L);
}

// model_Lt: None, or (B models only) a float64 [B] tensor on x's device.
void check_model_Lt(const c10::optional<at::Tensor>& model_Lt, const at::Tensor& x, const char* x_name,
                    const SymStackDims& d) {
  if (!model_Lt.has_value()) return;
  const at::Tensor& t = *model_Lt;
  TORCH_CHECK_VALUE(d.models, "model_Lt (a per-model Lt) needs B models (a 4-D W [B, L, w, w+1]); with one "
                    "model pass Lt alone, got model_Lt of shape ", t.sym_sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "model_Lt must be a float64 tensor [B], got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "model_Lt must be on the same device as ", x_name, " (",
                    x.device(), "), got ", t.device());
  CHECK_SHAPE(t, "model_Lt", "[B], one Lt per model", d.B);
}

void check_checkpoint(int64_t checkpoint) {
  TORCH_CHECK_VALUE(checkpoint >= 1, "checkpoint must be an interval k >= 1, got ", checkpoint);
}

StackDims concrete(const SymStackDims& d) {
  return {d.B.expect_int(), d.L.expect_int(), d.N.expect_int(), d.w.expect_int(), d.act, d.models};
}

// "rho[1]" or "rho[b, l]": the index of flat element i of t.
std::string element_name(const char* name, const at::Tensor& t, int64_t i) {
  std::ostringstream s;
  s << name << "[";
  if (t.dim() == 2) s << i / t.size(1) << ", " << i % t.size(1);
  else s << i;
  s << "]";
  return s.str();
}

}  // namespace

Activation parse_activation(c10::string_view activation) {
  if (activation == "relu") return Activation::kRelu;
  TORCH_CHECK_VALUE(activation == "linear", "activation must be \"relu\" or \"linear\", got \"",
                    std::string(activation), "\"");
  return Activation::kLinear;
}

SymStackDims check_stack_args_symint(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                                     double Lt, int64_t checkpoint, c10::string_view activation,
                                     const c10::optional<at::Tensor>& model_Lt, bool allow_half) {
  check_operands(x0, "x0", W, "W", rho, "rho", Lt, allow_half);
  const Activation act = parse_activation(activation);
  const bool models = check_W_rank(W);
  if (models) {
    CHECK_DIM(x0, "x0", 3, "[B, N, w] (B models: W is 4-D)");
  } else {
    CHECK_DIM(x0, "x0", 2, "[N, w]");
  }
  const SymStackDims d{models ? x0.sym_size(0) : c10::SymInt(1), W.sym_size(-3), x0.sym_size(-2),
                       x0.sym_size(-1), act, models};
  TORCH_CHECK_VALUE(holds(d.w.sym_ge(1)), "x0 must have width w >= 1, got shape ", x0.sym_sizes());
  check_W_rho(W, rho, d);
  check_model_Lt(model_Lt, x0, "x0", d);
  check_checkpoint(checkpoint);
  return d;
}

SymStackDims check_stack_backward_args_symint(const at::Tensor& grad, const at::Tensor& states,
                                              const at::Tensor& W, const at::Tensor& rho, double Lt,
                                              int64_t checkpoint, c10::string_view activation,
                                              const c10::optional<at::Tensor>& model_Lt,
                                              bool allow_half) {
  check_operands(grad, "grad", W, "W", rho, "rho", Lt, allow_half);
  const Activation act = parse_activation(activation);
  CHECK_DTYPE(states, "states", grad, "grad");
  CHECK_DEVICE(states, "states", grad, "grad");
  const bool models = check_W_rank(W);
  const int64_t m = models ? 1 : 0;  // the leading model dimension
  const char* lead = models ? "B, " : "";
  TORCH_CHECK_VALUE(grad.dim() == 2 + m || grad.dim() == 3 + m, "grad must be [", lead, "N, w] (of X_L) or [",
                    lead, "L+1, N, w] (of every X_l), got shape ", grad.sym_sizes());
  const SymStackDims d{models ? W.sym_size(0) : c10::SymInt(1), W.sym_size(-3), grad.sym_size(-2),
                       W.sym_size(-2), act, models};
  const bool per_layer = grad.dim() == 3 + m;
  std::vector<c10::SymInt> gshape;
  if (models) gshape.push_back(d.B);
  if (per_layer) gshape.push_back(d.L + 1);
  gshape.insert(gshape.end(), {d.N, d.w});
  TORCH_CHECK_VALUE(sizes_equal(grad.sym_sizes(), gshape), "grad must be [", lead, per_layer ? "L+1, " : "",
                    "N, w] = ", c10::SymIntArrayRef(gshape), " (from W ", W.sym_sizes(), "), got ",
                    grad.sym_sizes());
  check_W_rho(W, rho, d);
  check_model_Lt(model_Lt, grad, "grad", d);
  check_checkpoint(checkpoint);
  CHECK_DIM(states, "states", 3 + m, models ? "[B, S, N, w]" : "[S, N, w]");
  const c10::SymInt S = num_states(d.L, checkpoint);
  TORCH_CHECK_VALUE((!models || holds(states.sym_size(0).sym_eq(d.B))) && holds(states.sym_size(m).sym_ge(S)) &&
                        holds(states.sym_size(m + 1).sym_eq(d.N)) && holds(states.sym_size(m + 2).sym_eq(d.w)),
                    "states must hold the ceil(L/k) = ", S, " saved representations [", lead, S, "+, ", d.N,
                    ", ", d.w, "] (checkpoint k = ", checkpoint, "), got ", states.sym_sizes());
  return d;
}

StackDims check_stack_args(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                           double Lt, int64_t checkpoint, c10::string_view activation,
                           const c10::optional<at::Tensor>& model_Lt, bool allow_half) {
  return concrete(check_stack_args_symint(x0, W, rho, Lt, checkpoint, activation, model_Lt, allow_half));
}

StackDims check_stack_backward_args(const at::Tensor& grad, const at::Tensor& states,
                                    const at::Tensor& W, const at::Tensor& rho, double Lt,
                                    int64_t checkpoint, c10::string_view activation,
                                    const c10::optional<at::Tensor>& model_Lt, bool allow_half) {
  return concrete(check_stack_backward_args_symint(grad, states, W, rho, Lt, checkpoint, activation,
                                                   model_Lt, allow_half));
}

void check_rho_values(const at::Tensor& rho) {
  if (rho.numel() == 0) return;
  const at::Tensor r = rho.detach().to(at::kCPU, at::kDouble).contiguous();
  const double* p = r.data_ptr<double>();
  for (int64_t i = 0; i < r.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]) && p[i] >= 0.0, "rho must hold finite steps rho_l >= 0, got ",
                      element_name("rho", r, i), " = ", p[i]);
  }
}

void check_model_Lt_values(const c10::optional<at::Tensor>& model_Lt) {
  if (!model_Lt.has_value() || model_Lt->numel() == 0) return;
  const at::Tensor t = model_Lt->detach().to(at::kCPU).contiguous();
  const double* p = t.data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]), "model_Lt must hold finite effective depths, got model_Lt[", i,
                      "] = ", p[i]);
  }
}

namespace {

// The Meta kernels: the shared checks on (possibly symbolic) sizes, then empty outputs. Half types
// are allowed here (the CUDA kernels take them); the CPU kernel refuses them when it runs.
std::tuple<at::Tensor, at::Tensor> leaky_stack_meta(const at::Tensor& x0, const at::Tensor& W,
                                                    const at::Tensor& rho, double Lt, bool return_all,
                                                    int64_t checkpoint, c10::string_view activation,
                                                    const c10::optional<at::Tensor>& model_Lt) {
  const SymStackDims d =
      check_stack_args_symint(x0, W, rho, Lt, checkpoint, activation, model_Lt, /*allow_half=*/true);
  return empty_stack_outputs(d, return_all, checkpoint, x0.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_meta(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho, double Lt,
    int64_t checkpoint, c10::string_view activation, const c10::optional<at::Tensor>& model_Lt) {
  const SymStackDims d = check_stack_backward_args_symint(grad, states, W, rho, Lt, checkpoint, activation,
                                                          model_Lt, /*allow_half=*/true);
  return empty_stack_grads(d, grad.options());
}

}  // namespace

namespace {

// The one-layer op's own check, in its own terms (x [N, w], W_l [w, w+1], rho_l a single step), so
// that its errors never speak of the stack it runs as. Half types pass except on the CPU (the stack
// op's kernels decide); grad, when given, must be x's shape.
void check_layer_args(const at::Tensor* grad, const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho,
                      double Lt, c10::string_view activation) {
  check_operands(x, "x", W, "W_l", rho, "rho_l", Lt, /*allow_half=*/!x.is_cpu());
  parse_activation(activation);
  CHECK_DIM(x, "x", 2, "[N, w]");
  const c10::SymInt w = x.sym_size(1);
  TORCH_CHECK_VALUE(holds(w.sym_ge(1)), "x must be [N, w] with width w >= 1, got shape ", x.sym_sizes());
  const std::vector<c10::SymInt> want = {w, w + 1};
  if (!sizes_equal(W.sym_sizes(), want)) {
    const bool square = W.dim() == 2 && holds(W.sym_size(0).sym_eq(w)) && holds(W.sym_size(1).sym_eq(w));
    TORCH_CHECK_VALUE(false, "W_l must be one layer's weight [w, w+1] = ", c10::SymIntArrayRef(want),
                      " with w = x.size(1), got ", W.sym_sizes(),
                      square ? "; the last column is the bias (W_l = [V_l | b_l])" : "");
  }
  TORCH_CHECK_VALUE(rho.dim() <= 1 && holds(rho.sym_numel().sym_eq(1)),
                    "rho_l must be a single step (a number or a 0-d tensor), got shape ", rho.sym_sizes());
  if (grad) {
    CHECK_DTYPE((*grad), "grad", x, "x");
    CHECK_DEVICE((*grad), "grad", x, "x");
    CHECK_SHAPE((*grad), "grad", "x's shape [N, w]", x.sym_size(0), w);
  }
}

// One leaky residual layer as a one-layer stack; dispatches to the stack op of x's device.
at::Tensor leaky_layer(const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho, double Lt,
                       c10::string_view activation) {
  check_layer_args(nullptr, x, W, rho, Lt, activation);
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
  check_layer_args(&grad, x, W, rho, Lt, activation);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("leakycuda::leaky_stack_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, int64_t, c10::string_view,
                           const c10::optional<at::Tensor>&)>();
  auto [dx, dW, drho] =
      op.call(grad, x.unsqueeze(0), W.unsqueeze(0), rho.reshape({1}), Lt, 1, activation, c10::nullopt);
  return {dx, dW.squeeze(0), drho.reshape_symint(rho.sym_sizes())};
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

// Shapes under tracing (FakeTensor, torch.compile): the same checks as the kernels, no data.
TORCH_LIBRARY_IMPL(leakycuda, Meta, m) {
  m.impl("leaky_stack", &leakycuda::leaky_stack_meta);
  m.impl("leaky_stack_backward", &leakycuda::leaky_stack_backward_meta);
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
