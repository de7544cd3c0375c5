// Argument checks of the leaky-stack ops (leaky_stack, leaky_stack_backward and the one-layer
// leaky_layer), on symbolic sizes so that the same check runs in every kernel (CPU, CUDA) and, under
// tracing (FakeTensor, torch.compile with dynamic shapes), in the Meta kernels defined here. Shape and
// value problems raise ValueError, dtype problems TypeError; messages name the argument, the given and
// the expected.
#include <ATen/ATen.h>
#include <c10/core/SymInt.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "../checks.h"
#include "../leaky_stack.h"

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

}  // namespace leakycuda
