// Device-generic implementation of the COI / K-norm / energies ops from batched ATen calls only:
// what CUDA runs when no fused kernel applies, and what the CPU ops run under
// LEAKYCUDA_CPU_ATEN_ENERGIES=1 (so that CPU tests prove this code).
//
// Precision: every operand is converted to float64 first, and every Gram (bmm), solve (batched
// Cholesky, linalg_cholesky_ex + cholesky_solve, with an eigh fallback), residual and sum runs in
// float64, exactly as the CPU kernel; values are rounded to the input dtype once, at the end. The
// value is the ridge objective ||M - S Z||^2 / gamma + ||Z||^2 (no cancellation however small gamma is).
// Entries are processed in chunks whose float64 temporaries stay under kChunkBytes.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <vector>

#include "../energies.h"

namespace leakycuda {

namespace {

constexpr int64_t kChunkBytes = int64_t(256) << 20;

enum class Kind {
  kCoi,       // M = X
  kKNorm,     // M given, [B, N, m]
  kEnergies,  // xs [B+1, N, w]: X = xs[b], M = [X_b | D_b = (xs[b+1] - xs[b]) / rho_b]
};

// One K-norm problem over B entries: the metric X_b, S_b = sigma(X_b) [N, p], and the blocks * m
// columns M_b whose K-norms are taken.
struct Problem {
  Kind kind;
  at::Tensor X;    // [B, N, w] (kEnergies: xs, [B+1, N, w])
  at::Tensor M;    // kKNorm: [B, N, m]
  at::Tensor rho;  // kEnergies: [B] float64
  KNormDims d;
  int64_t blocks;
  bool bias;

  int64_t mc() const { return d.m * blocks; }

  // Entries per chunk: x, S, M, the residual and the metric term of one entry are N * (2w + p + 2mc) doubles.
  int64_t chunk() const {
    const int64_t per = std::max<int64_t>(1, d.N * (2 * d.w + d.p + 2 * mc()) * int64_t(sizeof(double)));
    return std::max<int64_t>(1, kChunkBytes / per);
  }

  // Float64 metric X of entries [b0, b0 + n).
  at::Tensor x(int64_t b0, int64_t n) const { return X.narrow(0, b0, n).to(at::kDouble); }

  // Float64 columns M of entries [b0, b0 + n), given their metric x.
  at::Tensor m(int64_t b0, int64_t n, const at::Tensor& x) const {
    switch (kind) {
      case Kind::kCoi:
        return x;
      case Kind::kKNorm:
        return M.narrow(0, b0, n).to(at::kDouble);
      case Kind::kEnergies:
        break;
    }
    const at::Tensor D = (X.narrow(0, b0 + 1, n).to(at::kDouble) - x) / rho.narrow(0, b0, n).view({n, 1, 1});
    return at::cat({x, D}, 2);
  }
};

// Per entry and block, the sums of squares of T [n, rows, blocks * m] -> [n, blocks].
at::Tensor block_sumsq(const at::Tensor& T, int64_t blocks, int64_t m) {
  return T.square().view({T.size(0), T.size(1), blocks, m}).sum({1, 3});
}

struct Forward {
  at::Tensor values;  // [B, blocks] float64: ||M_k||^2_{K,gamma}, or the raw ||M_k||^2 where gamma = 0
  at::Tensor gamma;   // [B] float64
  at::Tensor Z;       // [B, p, mc] float64
};

// Z = (S^T S + gamma I)^{-1} S^T M (or S^T (S S^T + gamma I)^{-1} M when N < p), then the ridge
// objective per block. Entries whose gamma is 0 (gamma0 policy with S = 0, possible only with
// bias=False) get Z = 0 and the raw ||M_k||^2: finish_knorm_values maps them to 0 or +inf.
Forward forward(const Problem& P, const c10::optional<at::Tensor>& gamma, double gamma0) {
  const KNormDims& d = P.d;
  const int64_t mc = P.mc();
  const auto opt = P.X.options().dtype(at::kDouble);
  Forward f{at::empty({d.B, P.blocks}, opt),
            gamma.has_value() ? given_gamma(*gamma, d.B, P.X.device()) : at::empty({d.B}, opt),
            at::empty({d.B, d.p, mc}, opt)};
  const bool gram = d.N >= d.p;
  for (int64_t b0 = 0; b0 < d.B; b0 += P.chunk()) {
    const int64_t n = std::min(P.chunk(), d.B - b0);
    const at::Tensor x = P.x(b0, n), M = P.m(b0, n, x), S = sigma_of(x, P.bias, d.relu), St = S.transpose(1, 2);
    at::Tensor A = gram ? at::bmm(St, S) : at::bmm(S, St);
    at::Tensor g = f.gamma.narrow(0, b0, n);
    if (!gamma.has_value()) g.copy_(gamma_policy(A, gamma0));
    const at::Tensor dead = g.eq(0.0).view({n, 1, 1});
    A.diagonal(0, 1, 2).add_(g.unsqueeze(1));
    A = at::where(dead, at::eye(A.size(1), opt), A);
    at::Tensor Z = solve_spd(A, gram ? at::bmm(St, M) : M, g);
    if (!gram) Z = at::bmm(St, Z);
    Z = at::where(dead, at::zeros({}, opt), Z);
    f.Z.narrow(0, b0, n).copy_(Z);
    const at::Tensor rr = block_sumsq(at::baddbmm(M, S, Z, 1.0, -1.0), P.blocks, d.m);  // ||M - S Z||^2
    const at::Tensor value = at::where(dead.view({n, 1}), rr, rr / g.unsqueeze(1) + block_sumsq(Z, P.blocks, d.m));
    f.values.narrow(0, b0, n).copy_(value);
  }
  return f;
}

// Gradients of one problem, written into the given float tensors (undefined = not wanted).
struct Grads {
  at::Tensor dX;     // kCoi, kKNorm: [B, N, w]; kEnergies: dxs [B+1, N, w] (zero-filled), both parts added
  at::Tensor dM;     // kKNorm: [B, N, m]
  at::Tensor drho;   // kEnergies: [B] float64
};

// Backward given coef [B, blocks] = dLoss/dvalue_k (gamma held fixed). With Q_k = 2 c_k (M_k - S Z_k)/gamma:
// dM_k = Q_k and the metric term dX = -[sum_k Q_k Z_k^T][:, :w] * sigma'(X); entries with gamma = 0 get 0.
void backward(const Problem& P, const at::Tensor& coef, const at::Tensor& Zall, const at::Tensor& gamma,
              const Grads& out) {
  const KNormDims& d = P.d;
  const int64_t w = d.w, mc = P.mc();
  for (int64_t b0 = 0; b0 < d.B; b0 += P.chunk()) {
    const int64_t n = std::min(P.chunk(), d.B - b0);
    const at::Tensor x = P.x(b0, n), M = P.m(b0, n, x), S = sigma_of(x, P.bias, d.relu);
    const at::Tensor Z = Zall.narrow(0, b0, n), g = gamma.narrow(0, b0, n).unsqueeze(1);
    const at::Tensor scale = at::where(g.ne(0.0), coef.narrow(0, b0, n) * 2.0 / g, at::zeros({}, g.options()));
    const at::Tensor Q = at::baddbmm(M, S, Z, 1.0, -1.0).view({n, d.N, P.blocks, d.m})
                             .mul(scale.view({n, 1, P.blocks, 1})).view({n, d.N, mc});
    const at::Tensor Pm = at::bmm(Q, Z.narrow(1, 0, w).transpose(1, 2));
    // sigma'(X): 1 for linear; for relu as relu's backward has it, 0 where X <= 0, else 1 (NaN passes).
    const at::Tensor metric = d.relu ? at::where(x.le(0.0), at::zeros({}, Pm.options()), Pm) : Pm;
    const auto dt = out.dX.scalar_type();
    switch (P.kind) {
      case Kind::kCoi:
        out.dX.narrow(0, b0, n).copy_(Q - metric);
        break;
      case Kind::kKNorm:
        out.dX.narrow(0, b0, n).copy_(metric.neg());
        out.dM.narrow(0, b0, n).copy_(Q);
        break;
      case Kind::kEnergies: {
        const at::Tensor r = P.rho.narrow(0, b0, n).view({n, 1, 1});
        const at::Tensor Q1 = Q.narrow(2, w, w), Qr = Q1 / r;  // dLoss/dD_l / rho_l
        out.dX.narrow(0, b0, n).add_((Q.narrow(2, 0, w) - Qr - metric).to(dt));
        out.dX.narrow(0, b0 + 1, n).add_(Qr.to(dt));
        // D = (X_{l} - X_{l-1}) / rho: dD/drho = -D / rho.
        out.drho.narrow(0, b0, n).copy_((Q1 * M.narrow(2, w, w)).sum({1, 2}).neg() / r.view({n}));
        break;
      }
    }
  }
}

std::vector<int64_t> batch_shape(const at::Tensor& X, std::initializer_list<int64_t> tail = {}) {
  std::vector<int64_t> s(X.sizes().begin(), X.sizes().end() - 2);
  s.insert(s.end(), tail);
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_aten(
    const at::Tensor& X, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::cost_of_identity", std::vector<c10::IValue>());
  const KNormDims d = check_coi_args(X, gamma, gamma0, bias, activation);
  const Problem P{Kind::kCoi, X.reshape({d.B, d.N, d.w}), {}, {}, d, 1, bias};
  const Forward f = forward(P, gamma, gamma0);
  return {finish_knorm_values(f.values, f.gamma).select(1, 0).to(X.scalar_type()).reshape(batch_shape(X)),
          f.gamma.reshape(batch_shape(X)), f.Z.reshape(batch_shape(X, {d.p, d.w}))};
}

at::Tensor cost_of_identity_backward_aten(const at::Tensor& grad, const at::Tensor& X,
                                          const at::Tensor& Z, const at::Tensor& gamma, bool bias,
                                          c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::cost_of_identity_backward", std::vector<c10::IValue>());
  const KNormDims d = check_coi_backward_args(grad, X, Z, gamma, bias, activation);
  const Problem P{Kind::kCoi, X.reshape({d.B, d.N, d.w}), {}, {}, d, 1, bias};
  at::Tensor dX = at::empty({d.B, d.N, d.w}, X.options());
  backward(P, grad.detach().to(at::kDouble).reshape({d.B, 1}), Z.reshape({d.B, d.p, d.w}), gamma.reshape(-1),
           Grads{dX, {}, {}});
  return dX.view(X.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_aten(const at::Tensor& M, const at::Tensor& X,
                                                            const c10::optional<at::Tensor>& gamma,
                                                            double gamma0, bool bias, c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::k_norm2", std::vector<c10::IValue>());
  const KNormDims d = check_knorm_args(M, X, gamma, gamma0, bias, activation);
  const Problem P{Kind::kKNorm, X.reshape({d.B, d.N, d.w}), M.reshape({d.B, d.N, d.m}), {}, d, 1, bias};
  const Forward f = forward(P, gamma, gamma0);
  return {finish_knorm_values(f.values, f.gamma).select(1, 0).to(X.scalar_type()).reshape(batch_shape(X)),
          f.gamma.reshape(batch_shape(X)), f.Z.reshape(batch_shape(X, {d.p, d.m}))};
}

std::tuple<at::Tensor, at::Tensor> k_norm2_backward_aten(const at::Tensor& grad, const at::Tensor& M,
                                                         const at::Tensor& X, const at::Tensor& Z,
                                                         const at::Tensor& gamma, bool bias,
                                                         c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::k_norm2_backward", std::vector<c10::IValue>());
  const KNormDims d = check_knorm_backward_args(grad, M, X, Z, gamma, bias, activation);
  const Problem P{Kind::kKNorm, X.reshape({d.B, d.N, d.w}), M.reshape({d.B, d.N, d.m}), {}, d, 1, bias};
  at::Tensor dX = at::empty({d.B, d.N, d.w}, X.options()), dM = at::empty({d.B, d.N, d.m}, M.options());
  backward(P, grad.detach().to(at::kDouble).reshape({d.B, 1}), Z.reshape({d.B, d.p, d.m}), gamma.reshape(-1),
           Grads{dX, dM, {}});
  return {dM.view(M.sizes()), dX.view(X.sizes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_aten(const at::Tensor& xs, const at::Tensor& rho, double Lt,
              const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::energies", std::vector<c10::IValue>());
  const KNormDims d = check_energies_args(xs, rho, Lt, gamma, gamma0, bias, activation);
  const Problem P{Kind::kEnergies, xs, {}, rho.detach().to(at::kDouble), d, 2, bias};
  const Forward f = forward(P, gamma, gamma0);
  const auto e = energies_from_values(f.values, f.gamma, Lt);
  const auto dt = xs.scalar_type();
  return {e[0].to(dt), e[1].to(dt), e[2].to(dt), e[3].to(dt), e[4].to(dt), f.gamma, f.Z};
}

std::tuple<at::Tensor, at::Tensor> energies_backward_aten(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs,
    const at::Tensor& rho, double Lt, const at::Tensor& Z, const at::Tensor& gamma, bool bias,
    c10::string_view activation) {
  RECORD_FUNCTION("leakycuda::generic::energies_backward", std::vector<c10::IValue>());
  const std::array<at::Tensor, 5> grads = {grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank};
  const KNormDims d = check_energies_backward_args(grads, xs, rho, Lt, Z, gamma, bias, activation);
  const Problem P{Kind::kEnergies, xs, {}, rho.detach().to(at::kDouble), d, 2, bias};
  at::Tensor dxs = at::zeros_like(xs, at::MemoryFormat::Contiguous);
  at::Tensor drho = at::empty({d.B}, xs.options().dtype(at::kDouble));
  backward(P, energies_coef(grads, Lt), Z.reshape({d.B, d.p, 2 * d.w}), gamma.reshape(-1), Grads{dxs, {}, drho});
  return {dxs, drho.to(rho.scalar_type())};
}

}  // namespace leakycuda
