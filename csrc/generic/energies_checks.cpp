// Argument checks of the COI / K-norm / energies ops, one per op, on symbolic sizes so that the same
// check runs in every kernel (CPU, device-generic, CUDA) and, under tracing (FakeTensor,
// torch.compile with dynamic shapes), in the Meta kernels defined here. Shape and value problems
// raise ValueError, dtype problems TypeError; messages name the argument, the given and the expected.
#include <ATen/ATen.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>

#include <cmath>
#include <string>
#include <vector>

#include "../energies.h"

namespace leakycuda {

namespace {

using SymSizes = std::vector<c10::SymInt>;

// Whether a size condition holds; on symbolic sizes it defers a runtime assert, as ATen's meta functions do.
bool sym_holds(const c10::SymBool& b) { return b.expect_true(__FILE__, __LINE__); }

bool sym_sizes_equal(c10::SymIntArrayRef got, c10::SymIntArrayRef want) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); ++i)
    if (!sym_holds(got[i].sym_eq(want[i]))) return false;
  return true;
}

SymSizes with_tail(c10::SymIntArrayRef batch, std::initializer_list<c10::SymInt> tail) {
  SymSizes s(batch.begin(), batch.end());
  s.insert(s.end(), tail);
  return s;
}

c10::SymIntArrayRef batch_of(const at::Tensor& X) { return X.sym_sizes().slice(0, X.dim() - 2); }

void check_energy_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// X [..., N, w] with w >= 1 and sigma's activation: the sizes of its K-norm problem (m = w).
SymKNormDims dims_of(const at::Tensor& X, const char* name, bool bias, c10::string_view activation) {
  TORCH_CHECK_VALUE(X.dim() >= 2, name,
                    " must be [..., N, w] (samples x width, with optional leading batch dims), got shape ",
                    X.sym_sizes());
  const c10::SymInt N = X.sym_size(-2), w = X.sym_size(-1);
  TORCH_CHECK_VALUE(sym_holds(w.sym_ge(1)), name, " must be [..., N, w] with width w >= 1, got shape ",
                    X.sym_sizes());
  return {c10::multiply_integers(batch_of(X)), N, w, w + (bias ? 1 : 0), w, energy_relu(activation)};
}

// A forward's gamma: a floating tensor of one value or one per batch entry (`batch`), on ref's
// device; without it gamma0 > 0 is the policy.
void check_gamma_arg(const c10::optional<at::Tensor>& gamma, double gamma0, c10::SymIntArrayRef batch,
                     const at::Tensor& ref, const char* ref_name, const char* per) {
  if (gamma.has_value()) {
    const at::Tensor& g = *gamma;
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), "gamma must be a floating tensor (one ridge ", per,
                     "), got ", g.scalar_type());
    check_same_device(g, "gamma", ref, ref_name);
    TORCH_CHECK_VALUE(sym_holds(g.sym_numel().sym_eq(1)) || sym_sizes_equal(g.sym_sizes(), batch),
                      "gamma must be one value or one ", per, ", of shape ", batch, ", got shape ", g.sym_sizes());
  } else {
    TORCH_CHECK_VALUE(std::isfinite(gamma0) && gamma0 > 0.0,
                      "gamma0 must be finite and > 0 when gamma is None (gamma = gamma0 * ||sigma(X)||_op^2), got ",
                      gamma0, " (the exact COI, gamma = 0, is the op cost_of_identity_exact)");
  }
}

// What a backward gets back from its forward: Z [batch..., p, m * blocks] and gamma_used [batch...],
// both float64 on ref's device.
void check_saved(const at::Tensor& Z, const at::Tensor& gamma, const SymKNormDims& d, c10::SymIntArrayRef batch,
                 const at::Tensor& ref, const char* ref_name, int64_t blocks) {
  TORCH_CHECK_TYPE(Z.scalar_type() == at::kDouble && gamma.scalar_type() == at::kDouble,
                   "Z and gamma must be the float64 tensors the forward returned, got ", Z.scalar_type(), " and ",
                   gamma.scalar_type());
  check_same_device(Z, "Z", ref, ref_name);
  check_same_device(gamma, "gamma", ref, ref_name);
  const SymSizes want = with_tail(batch, {d.p, d.m * blocks});
  TORCH_CHECK_VALUE(sym_sizes_equal(Z.sym_sizes(), want), "Z must be the forward's solve [..., p, m] = ",
                    c10::SymIntArrayRef(want), ", got ", Z.sym_sizes());
  TORCH_CHECK_VALUE(sym_sizes_equal(gamma.sym_sizes(), batch), "gamma must be the forward's gamma_used of shape ",
                    batch, ", got ", gamma.sym_sizes());
}

// The gradient of a [batch]-valued output: floating, on ref's device, one value per batch entry.
void check_grad(const at::Tensor& grad, const char* name, const c10::SymInt& B, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), name, " must be a floating tensor, got ",
                   grad.scalar_type());
  check_same_device(grad, name, ref, ref_name);
  TORCH_CHECK_VALUE(sym_holds(grad.sym_numel().sym_eq(B)), name, " must hold one value per batch entry of ",
                    ref_name, " (", B, "), got shape ", grad.sym_sizes());
}

// xs [L+1, N, w] (L+1 >= 1, w >= 1), rho [L] floating on xs's device, Lt finite.
SymKNormDims check_trajectory(const at::Tensor& xs, const at::Tensor& rho, double Lt, bool bias,
                              c10::string_view activation) {
  check_energy_dtype(xs, "xs");
  TORCH_CHECK_VALUE(xs.dim() == 3 && sym_holds(xs.sym_size(0).sym_ge(1)) && sym_holds(xs.sym_size(2).sym_ge(1)),
                    "xs must be [L+1, N, w] (every representation X_0..X_L of one batch, L+1 >= 1, w >= 1), got "
                    "shape ", xs.sym_sizes());
  const c10::SymInt L = xs.sym_size(0) - 1, N = xs.sym_size(1), w = xs.sym_size(2);
  TORCH_CHECK_TYPE(at::isFloatingType(rho.scalar_type()), "rho must be a floating tensor [L], got ",
                   rho.scalar_type());
  check_same_device(rho, "rho", xs, "xs");
  TORCH_CHECK_VALUE(rho.dim() == 1 && sym_holds(rho.sym_size(0).sym_eq(L)), "rho must be [L] = [", L,
                    "], one step per layer (xs holds L+1 = ", L + 1, " representations), got shape ",
                    rho.sym_sizes());
  TORCH_CHECK_VALUE(std::isfinite(Lt), "Lt must be finite, got ", Lt);
  return {L, N, w, w + (bias ? 1 : 0), w, energy_relu(activation)};
}

KNormDims concrete(const SymKNormDims& d) {
  return {d.B.expect_int(), d.N.expect_int(), d.w.expect_int(), d.p.expect_int(), d.m.expect_int(), d.relu};
}

void check_gamma_values_if_given(const c10::optional<at::Tensor>& gamma) {
  if (gamma.has_value()) check_gamma_values(*gamma);
}

}  // namespace

bool energy_relu(c10::string_view activation) {
  if (activation == "relu") return true;
  TORCH_CHECK_VALUE(activation == "linear", "activation must be \"relu\" or \"linear\", got \"",
                    std::string(activation), "\"");
  return false;
}

SymKNormDims check_coi_args_symint(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0,
                                   bool bias, c10::string_view activation) {
  check_energy_dtype(X, "X");
  const SymKNormDims d = dims_of(X, "X", bias, activation);
  check_gamma_arg(gamma, gamma0, batch_of(X), X, "X", "per batch entry of X");
  return d;
}

SymKNormDims check_knorm_args_symint(const at::Tensor& M, const at::Tensor& X,
                                     const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                                     c10::string_view activation) {
  check_energy_dtype(X, "X");
  TORCH_CHECK_TYPE(M.scalar_type() == X.scalar_type(), "M must have the dtype of X (", X.scalar_type(), "), got ",
                   M.scalar_type());
  check_same_device(M, "M", X, "X");
  SymKNormDims d = dims_of(X, "X", bias, activation);
  TORCH_CHECK_VALUE(M.dim() == X.dim() && sym_sizes_equal(M.sym_sizes().slice(0, M.dim() - 1),
                                                          X.sym_sizes().slice(0, X.dim() - 1)),
                    "M must be [..., N, m] with the leading dims and N of X ", X.sym_sizes(),
                    " (the K-norm is taken in the sample space of X), got ", M.sym_sizes());
  d.m = M.sym_size(-1);
  check_gamma_arg(gamma, gamma0, batch_of(X), X, "X", "per batch entry of X");
  return d;
}

SymKNormDims check_energies_args_symint(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                                        const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                                        c10::string_view activation) {
  const SymKNormDims d = check_trajectory(xs, rho, Lt, bias, activation);
  check_gamma_arg(gamma, gamma0, {d.B}, xs, "xs", "per layer");
  return d;
}

SymKNormDims check_coi_backward_args_symint(const at::Tensor& grad, const at::Tensor& X, const at::Tensor& Z,
                                            const at::Tensor& gamma, bool bias, c10::string_view activation) {
  check_energy_dtype(X, "X");
  const SymKNormDims d = dims_of(X, "X", bias, activation);
  check_saved(Z, gamma, d, batch_of(X), X, "X", 1);
  check_grad(grad, "grad", d.B, X, "X");
  return d;
}

SymKNormDims check_knorm_backward_args_symint(const at::Tensor& grad, const at::Tensor& M, const at::Tensor& X,
                                              const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                              c10::string_view activation) {
  const SymKNormDims d = check_knorm_args_symint(M, X, c10::nullopt, 1.0, bias, activation);
  check_saved(Z, gamma, d, batch_of(X), X, "X", 1);
  check_grad(grad, "grad", d.B, X, "X");
  return d;
}

SymKNormDims check_energies_backward_args_symint(const std::array<at::Tensor, 5>& grads, const at::Tensor& xs,
                                                 const at::Tensor& rho, double Lt, const at::Tensor& Z,
                                                 const at::Tensor& gamma, bool bias, c10::string_view activation) {
  const SymKNormDims d = check_trajectory(xs, rho, Lt, bias, activation);
  check_saved(Z, gamma, d, {d.B}, xs, "xs", 2);
  const char* names[5] = {"grad_coi", "grad_kinetic", "grad_potential", "grad_hamiltonian", "grad_rank"};
  for (int i = 0; i < 5; ++i) check_grad(grads[i], names[i], d.B, xs, "xs (one per layer)");
  return d;
}

SymKNormDims check_exact_args_symint(const at::Tensor& X, c10::optional<double> rcond, bool bias,
                                     c10::string_view activation) {
  const auto dt = X.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kDouble || dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "X must be a floating tensor (float64, float32, float16 or bfloat16), got ", dt);
  const SymKNormDims d = dims_of(X, "X", bias, activation);
  TORCH_CHECK_VALUE(!rcond.has_value() || (std::isfinite(*rcond) && *rcond >= 0.0),
                    "rcond must be finite and >= 0 (relative singular-value cutoff), got ", rcond.value_or(0.0));
  return d;
}

KNormDims check_coi_args(const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                         c10::string_view activation) {
  const KNormDims d = concrete(check_coi_args_symint(X, gamma, gamma0, bias, activation));
  check_gamma_values_if_given(gamma);
  return d;
}

KNormDims check_knorm_args(const at::Tensor& M, const at::Tensor& X, const c10::optional<at::Tensor>& gamma,
                           double gamma0, bool bias, c10::string_view activation) {
  const KNormDims d = concrete(check_knorm_args_symint(M, X, gamma, gamma0, bias, activation));
  check_gamma_values_if_given(gamma);
  return d;
}

KNormDims check_energies_args(const at::Tensor& xs, const at::Tensor& rho, double Lt,
                              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
                              c10::string_view activation) {
  const KNormDims d = concrete(check_energies_args_symint(xs, rho, Lt, gamma, gamma0, bias, activation));
  check_step_values(rho);
  check_gamma_values_if_given(gamma);
  return d;
}

KNormDims check_coi_backward_args(const at::Tensor& grad, const at::Tensor& X, const at::Tensor& Z,
                                  const at::Tensor& gamma, bool bias, c10::string_view activation) {
  return concrete(check_coi_backward_args_symint(grad, X, Z, gamma, bias, activation));
}

KNormDims check_knorm_backward_args(const at::Tensor& grad, const at::Tensor& M, const at::Tensor& X,
                                    const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                    c10::string_view activation) {
  return concrete(check_knorm_backward_args_symint(grad, M, X, Z, gamma, bias, activation));
}

KNormDims check_energies_backward_args(const std::array<at::Tensor, 5>& grads, const at::Tensor& xs,
                                       const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma,
                                       bool bias, c10::string_view activation) {
  const KNormDims d = concrete(check_energies_backward_args_symint(grads, xs, rho, Lt, Z, gamma, bias, activation));
  check_step_values(rho);
  return d;
}

void check_gamma_values(const at::Tensor& gamma) {
  const at::Tensor g = gamma.detach().to(at::kCPU, at::kDouble).contiguous().reshape(-1);
  const double* p = g.data_ptr<double>();
  for (int64_t i = 0; i < g.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]) && p[i] > 0.0, "gamma must hold finite ridges > 0, got gamma[", i,
                      "] = ", p[i],
                      " (a zero ridge is the exact COI: cost_of_identity(X) with gamma=None or the number 0; "
                      "k_norm2 and energies need gamma > 0)");
  }
}

void check_step_values(const at::Tensor& rho) {
  const at::Tensor r = rho.detach().to(at::kCPU, at::kDouble).contiguous().reshape(-1);
  const double* p = r.data_ptr<double>();
  for (int64_t l = 0; l < r.numel(); ++l) {
    TORCH_CHECK_VALUE(std::isfinite(p[l]) && p[l] > 0.0,
                      "rho must hold finite steps rho_l > 0 (D_l = (X_l - X_{l-1})/rho_l), got rho[", l, "] = ", p[l]);
  }
}

// --- Meta kernels: the ops' checks on (possibly symbolic) sizes, then empty outputs of the kernels' shapes ---

using at::Tensor;

namespace {

at::TensorOptions f64(const Tensor& t) { return t.options().dtype(at::kDouble); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cost_of_identity_meta(const Tensor& X, const c10::optional<Tensor>& gamma,
                                                         double gamma0, bool bias, c10::string_view activation) {
  const SymKNormDims d = check_coi_args_symint(X, gamma, gamma0, bias, activation);
  const auto batch = batch_of(X);
  return {at::empty_symint(batch, X.options()), at::empty_symint(batch, f64(X)),
          at::empty_symint(with_tail(batch, {d.p, d.w}), f64(X))};
}

Tensor cost_of_identity_backward_meta(const Tensor& grad, const Tensor& X, const Tensor& Z, const Tensor& gamma,
                                      bool bias, c10::string_view activation) {
  check_coi_backward_args_symint(grad, X, Z, gamma, bias, activation);
  return at::empty_symint(X.sym_sizes(), X.options());
}

std::tuple<Tensor, Tensor, Tensor> cost_of_identity_exact_meta(const Tensor& X, c10::optional<double> rcond,
                                                               bool bias, c10::string_view activation) {
  check_exact_args_symint(X, rcond, bias, activation);
  const auto batch = batch_of(X);
  return {at::empty_symint(batch, X.options()), at::empty_symint(batch, X.options()),
          at::empty_symint(batch, X.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor, Tensor> k_norm2_meta(const Tensor& M, const Tensor& X, const c10::optional<Tensor>& gamma,
                                                double gamma0, bool bias, c10::string_view activation) {
  const SymKNormDims d = check_knorm_args_symint(M, X, gamma, gamma0, bias, activation);
  const auto batch = batch_of(X);
  return {at::empty_symint(batch, M.options()), at::empty_symint(batch, f64(X)),
          at::empty_symint(with_tail(batch, {d.p, d.m}), f64(X))};
}

std::tuple<Tensor, Tensor> k_norm2_backward_meta(const Tensor& grad, const Tensor& M, const Tensor& X,
                                                 const Tensor& Z, const Tensor& gamma, bool bias,
                                                 c10::string_view activation) {
  check_knorm_backward_args_symint(grad, M, X, Z, gamma, bias, activation);
  return {at::empty_symint(M.sym_sizes(), M.options()), at::empty_symint(X.sym_sizes(), X.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> energies_meta(
    const Tensor& xs, const Tensor& rho, double Lt, const c10::optional<Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation) {
  const SymKNormDims d = check_energies_args_symint(xs, rho, Lt, gamma, gamma0, bias, activation);
  const SymSizes L = {d.B};
  return {at::empty_symint(L, xs.options()), at::empty_symint(L, xs.options()), at::empty_symint(L, xs.options()),
          at::empty_symint(L, xs.options()), at::empty_symint(L, xs.options()), at::empty_symint(L, f64(xs)),
          at::empty_symint(SymSizes{d.B, d.p, d.w * 2}, f64(xs))};
}

std::tuple<Tensor, Tensor> energies_backward_meta(const Tensor& grad_coi, const Tensor& grad_kinetic,
                                                  const Tensor& grad_potential, const Tensor& grad_hamiltonian,
                                                  const Tensor& grad_rank, const Tensor& xs, const Tensor& rho,
                                                  double Lt, const Tensor& Z, const Tensor& gamma, bool bias,
                                                  c10::string_view activation) {
  check_energies_backward_args_symint({grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank}, xs,
                                      rho, Lt, Z, gamma, bias, activation);
  return {at::empty_symint(xs.sym_sizes(), xs.options()), at::empty_symint(rho.sym_sizes(), rho.options())};
}

}  // namespace leakycuda
