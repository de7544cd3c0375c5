// CPU kernels of the stable Cost of Identity, the K-norm and the energies along a trajectory:
// per batch entry a fused float64 pass builds [S | M], ATen GEMMs form the Grams, one small solve
// per entry gives Z = (S^T S + gamma I)^{-1} S^T M, and a second pass evaluates the ridge objective
// ||M - S Z||^2 / gamma + ||Z||^2 (equal to ||M||^2_{K,gamma} at the solution, and only perturbed to
// second order by errors in Z: no cancellation however small gamma is).
// Under LEAKYCUDA_CPU_ATEN_ENERGIES=1 every op runs the device-generic implementation instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../energies.h"

namespace leakycuda {

namespace {

// Where the columns of one batch entry come from.
enum class Source {
  kCoi,       // M = X (the COI)
  kKNorm,     // M given, [B, N, m]
  kEnergies,  // xs [B+1, N, w]: X = xs[b], two blocks M = [X_b | D_b = (xs[b+1] - xs[b]) / rho_b]
};

// Rows per task of the row passes, and per partial sum of their reductions: partials are summed
// in chunk order, so results do not depend on the number of threads.
inline int64_t rows_per_chunk(int64_t cols) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1)); }

// One K-norm problem over B entries: S_b = sigma(X_b) [N, p] and mc = blocks * m columns of M_b.
template <typename scalar_t>
struct Problem {
  Source src;
  const scalar_t* X;  // [B, N, w] (kEnergies: xs, [B+1, N, w])
  const scalar_t* M;  // kKNorm: [B, N, m]
  const double* rho;  // kEnergies: [B]
  int64_t B, N, w, p, m, blocks;
  bool bias;
  bool relu;  // sigma = [relu(X), 1], else [X, 1]

  int64_t mc() const { return m * blocks; }
  int64_t ld() const { return p + mc(); }

  // [S | M] of entry b as float64 into buf [N, ld]: act(X), the ones column, then the blocks of M.
  void fill(int64_t b, double* buf) const {
    const int64_t lda = ld();
    at::parallel_for(0, N, rows_per_chunk(lda), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* x = X + (b * N + i) * w;
        double* row = buf + i * lda;
        double* mrow = row + p;
        for (int64_t j = 0; j < w; ++j) {
          const double v = double(x[j]);
          row[j] = relu && v < 0.0 ? 0.0 : v;  // relu keeps NaN
        }
        if (bias) row[w] = 1.0;
        if (src == Source::kKNorm) {
          const scalar_t* mm = M + (b * N + i) * m;
          for (int64_t j = 0; j < m; ++j) mrow[j] = double(mm[j]);
        } else {
          for (int64_t j = 0; j < w; ++j) mrow[j] = double(x[j]);
        }
        if (src == Source::kEnergies) {
          const scalar_t* xn = x + N * w;
          const double r = rho[b];
          for (int64_t j = 0; j < w; ++j) mrow[w + j] = (double(xn[j]) - double(x[j])) / r;
        }
      }
    });
  }
};

// Runs f(b) for every entry: one task per entry when there are enough of them (the GEMMs inside
// then run single-threaded), else the entries in turn with threaded GEMMs and row passes.
template <typename F>
void for_each_entry(int64_t B, const F& f) {
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) f(b);
  }
}

// Column-block sums of squares of R [N, mc] (row stride ldr) into out[blocks], in a fixed order.
void block_sumsq(const double* R, int64_t N, int64_t ldr, int64_t m, int64_t blocks, double* out) {
  const int64_t rows = rows_per_chunk(m * blocks);
  const int64_t chunks = (N + rows - 1) / rows;
  std::vector<double> partial(chunks * blocks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t i = c * rows; i < std::min(N, (c + 1) * rows); ++i) {
        const double* r = R + i * ldr;
        for (int64_t k = 0; k < blocks; ++k) {
          double s = 0.0;
          for (int64_t j = 0; j < m; ++j) s += r[k * m + j] * r[k * m + j];
          partial[c * blocks + k] += s;
        }
      }
    }
  });
  for (int64_t k = 0; k < blocks; ++k) out[k] = 0.0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t k = 0; k < blocks; ++k) out[k] += partial[c * blocks + k];
}

// out[b] = fn(b), a one-entry call of a batched device-generic function, one entry per task (batched
// LAPACK calls oversubscribe the threads on CPU: 10x slower on 2 cores).
template <typename F>
void per_entry(at::Tensor out, const F& fn) {
  at::parallel_for(0, out.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out.narrow(0, b, 1).copy_(fn(b));
  });
}

struct ForwardOut {
  at::Tensor values;  // [B, blocks] float64: ||M_k||^2_{K,gamma}, or the raw ||M_k||^2 where gamma = 0
  at::Tensor gamma;   // [B] float64
  at::Tensor Z;       // [B, p, mc] float64
};

// Forward of every entry. Entries whose gamma is 0 (gamma0 policy with S = 0, possible only with
// bias=False) get Z = 0 and values[b, k] = ||M_k||^2: the caller maps them to 0 or +inf.
template <typename scalar_t>
ForwardOut knorm_forward(const Problem<scalar_t>& P, const c10::optional<at::Tensor>& gamma, double gamma0) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = P.B, N = P.N, p = P.p, mc = P.mc(), ld = P.ld();
  at::Tensor gam, A, rhs, S_all;
  if (N >= p) {
    // Pass 1: T_b = S^T [S | M] = [G | S^T M], one GEMM per entry.
    at::Tensor T = at::empty({B, p, ld}, opt);
    for_each_entry(B, [&](int64_t b) {
      at::Tensor buf = at::empty({N, ld}, opt);
      P.fill(b, buf.data_ptr<double>());
      at::Tensor Tb = T[b];
      at::mm_out(Tb, buf.narrow(1, 0, p).t(), buf);
    });
    A = T.narrow(2, 0, p).contiguous();
    rhs = T.narrow(2, p, mc).contiguous();
  } else {
    // N-space (N < p): K_b = S S^T [N, N]; Z = S^T (K + gamma I)^{-1} M.
    at::Tensor SM = at::empty({B, N, ld}, opt);
    for_each_entry(B, [&](int64_t b) { P.fill(b, SM[b].data_ptr<double>()); });
    S_all = SM.narrow(2, 0, p);
    A = at::bmm(S_all, S_all.transpose(1, 2));
    rhs = SM.narrow(2, p, mc).contiguous();
  }
  if (gamma.has_value()) {
    gam = given_gamma(*gamma, B, A.device());
  } else {
    gam = at::empty({B}, opt);
    per_entry(gam, [&](int64_t b) { return gamma_policy(A.narrow(0, b, 1), gamma0); });
  }
  const at::Tensor dead = gam.eq(0.0);
  const bool any_dead = dead.any().item<bool>();
  A.diagonal(0, 1, 2).add_(gam.unsqueeze(1));
  if (any_dead) A = at::where(dead.view({B, 1, 1}), at::eye(A.size(1), opt).expand_as(A), A);
  at::Tensor Z = at::empty(rhs.sizes(), opt);
  per_entry(Z, [&](int64_t b) {
    return solve_spd(A.narrow(0, b, 1), rhs.narrow(0, b, 1), gam.narrow(0, b, 1));
  });
  if (N < p) Z = at::bmm(S_all.transpose(1, 2), Z);
  if (any_dead) Z = at::where(dead.view({B, 1, 1}), at::zeros({}, opt), Z);
  Z = Z.contiguous();

  // Pass 2: R = M - S Z, values = ||R_k||^2 / gamma + ||Z_k||^2 per block.
  at::Tensor values = at::empty({B, P.blocks}, opt);
  const double* g = gam.data_ptr<double>();
  double* v = values.data_ptr<double>();
  for_each_entry(B, [&](int64_t b) {
    at::Tensor buf = at::empty({N, ld}, opt);
    P.fill(b, buf.data_ptr<double>());
    const at::Tensor Zb = Z[b];
    const at::Tensor R = at::addmm(buf.narrow(1, p, mc), buf.narrow(1, 0, p), Zb, 1.0, -1.0);
    std::vector<double> rr(P.blocks), zz(P.blocks, 0.0);
    block_sumsq(R.data_ptr<double>(), N, mc, P.m, P.blocks, rr.data());
    block_sumsq(Zb.data_ptr<double>(), p, mc, P.m, P.blocks, zz.data());
    for (int64_t k = 0; k < P.blocks; ++k) v[b * P.blocks + k] = g[b] != 0.0 ? rr[k] / g[b] + zz[k] : rr[k];
  });
  return {values, gam, Z};
}

// Outputs of the backward pass of one problem (float pointers into [B, N, *] tensors; null = skip).
template <typename scalar_t>
struct BackwardOut {
  scalar_t* dX;     // kCoi, kKNorm: [B, N, w]; kEnergies: the part of dxs[b] from layer b+1
  scalar_t* dM;     // kKNorm: [B, N, m]
  scalar_t* dnext;  // kEnergies: the part of dxs[b+1] from layer b+1 (through D)
  double* drho;     // kEnergies: [B]
};

// Backward of every entry, given coef [B, blocks] = dLoss/dvalue_k. With Q_k = (M_k - S Z_k)/gamma:
// dM_k = 2 c_k Q_k and the metric term dX = -2 [sum_k c_k Q_k Z_k^T][:, :w] * sigma'(X), sigma'(X) as
// relu's backward has it (0 where X <= 0, else 1: NaN passes), 1 for linear. Entries with gamma = 0 get 0.
template <typename scalar_t>
void knorm_backward(const Problem<scalar_t>& P, const double* coef, const at::Tensor& Z,
                    const double* gam, const BackwardOut<scalar_t>& out) {
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = P.N, w = P.w, p = P.p, m = P.m, mc = P.mc(), ld = P.ld(), nb = P.blocks;
  for_each_entry(P.B, [&](int64_t b) {
    const bool active = gam[b] != 0.0;
    at::Tensor buf = at::empty({N, ld}, opt);
    P.fill(b, buf.data_ptr<double>());
    at::Tensor Qc;  // [N, mc]: 2 c_k Q_k
    at::Tensor Pm;  // [N, w]: (sum_k 2 c_k Q_k Z_k^T)[:, :w]
    if (active) {
      const at::Tensor Zb = Z[b];
      Qc = at::addmm(buf.narrow(1, p, mc), buf.narrow(1, 0, p), Zb, 1.0, -1.0);
      for (int64_t k = 0; k < nb; ++k) Qc.narrow(1, k * m, m).mul_(2.0 * coef[b * nb + k] / gam[b]);
      Pm = at::mm(Qc, Zb.narrow(0, 0, w).t());
    }
    const double* q = active ? Qc.data_ptr<double>() : nullptr;
    const double* pm = active ? Pm.data_ptr<double>() : nullptr;
    const double* bf = buf.data_ptr<double>();
    const double r = P.src == Source::kEnergies ? P.rho[b] : 1.0;
    double dr = 0.0;
    const int64_t rows = rows_per_chunk(ld);
    const int64_t chunks = (N + rows - 1) / rows;
    std::vector<double> partial(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t i = c * rows; i < std::min(N, (c + 1) * rows); ++i) {
          const double* s = bf + i * ld;  // act(X) row, then M blocks
          const bool relu = P.relu;
          const int64_t o = (b * N + i);
          if (!active) {
            for (int64_t j = 0; j < w; ++j) out.dX[o * w + j] = scalar_t(0);
            if (out.dM) for (int64_t j = 0; j < m; ++j) out.dM[o * m + j] = scalar_t(0);
            if (out.dnext) for (int64_t j = 0; j < w; ++j) out.dnext[o * w + j] = scalar_t(0);
            continue;
          }
          const double* qi = q + i * mc;
          const double* pi = pm + i * w;
          switch (P.src) {
            case Source::kCoi:
              for (int64_t j = 0; j < w; ++j) out.dX[o * w + j] = scalar_t(qi[j] - (relu && s[j] <= 0.0 ? 0.0 : pi[j]));
              break;
            case Source::kKNorm:
              for (int64_t j = 0; j < w; ++j) out.dX[o * w + j] = scalar_t(relu && s[j] <= 0.0 ? 0.0 : -pi[j]);
              for (int64_t j = 0; j < m; ++j) out.dM[o * m + j] = scalar_t(qi[j]);
              break;
            case Source::kEnergies: {
              const double* d = s + p + w;  // D_b row
              double dot = 0.0;
              for (int64_t j = 0; j < w; ++j) {
                const double dd = qi[w + j] / r;
                dot += qi[w + j] * d[j];
                out.dX[o * w + j] = scalar_t(qi[j] - dd - (relu && s[j] <= 0.0 ? 0.0 : pi[j]));
                out.dnext[o * w + j] = scalar_t(dd);
              }
              partial[c] += dot;
              break;
            }
          }
        }
      }
    });
    for (double v : partial) dr += v;
    if (out.drho) out.drho[b] = -dr / r;  // D = (X_b+1 - X_b)/rho: dD/drho = -D/rho
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cost_of_identity_cpu(
    const at::Tensor& X_in, const c10::optional<at::Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation) {
  if (cpu_aten_energies()) return cost_of_identity_aten(X_in, gamma, gamma0, bias, activation);
  RECORD_FUNCTION("leakycuda::cpu::cost_of_identity", std::vector<c10::IValue>());
  const KNormDims d = check_coi_args(X_in, gamma, gamma0, bias, activation);
  const auto batch = X_in.sizes().slice(0, X_in.dim() - 2);
  std::vector<int64_t> zshape(batch.begin(), batch.end());
  zshape.push_back(d.p), zshape.push_back(d.w);
  const at::Tensor X = X_in.contiguous();
  at::Tensor coi, gam, Z;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "cost_of_identity_cpu", [&] {
    Problem<scalar_t> P{Source::kCoi, X.data_ptr<scalar_t>(), nullptr, nullptr, d.B, d.N, d.w, d.p, d.w, 1,
                        bias, d.relu};
    ForwardOut f = knorm_forward(P, gamma, gamma0);
    coi = finish_knorm_values(f.values, f.gamma).select(1, 0);
    gam = f.gamma, Z = f.Z;
  });
  return {coi.to(X.scalar_type()).reshape(batch), gam.reshape(batch), Z.reshape(zshape)};
}

at::Tensor cost_of_identity_backward_cpu(const at::Tensor& grad, const at::Tensor& X_in,
                                         const at::Tensor& Z_in, const at::Tensor& gamma, bool bias,
                                         c10::string_view activation) {
  if (cpu_aten_energies()) return cost_of_identity_backward_aten(grad, X_in, Z_in, gamma, bias, activation);
  RECORD_FUNCTION("leakycuda::cpu::cost_of_identity_backward", std::vector<c10::IValue>());
  const KNormDims d = check_coi_backward_args(grad, X_in, Z_in, gamma, bias, activation);
  const at::Tensor X = X_in.contiguous(), Z = Z_in.reshape({d.B, d.p, d.w}).contiguous();
  const at::Tensor coef = grad.detach().to(at::kDouble).reshape(-1).contiguous();
  const at::Tensor g = gamma.reshape(-1).contiguous();
  at::Tensor dX = at::empty_like(X);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "cost_of_identity_backward_cpu", [&] {
    Problem<scalar_t> P{Source::kCoi, X.data_ptr<scalar_t>(), nullptr, nullptr, d.B, d.N, d.w, d.p, d.w, 1,
                        bias, d.relu};
    knorm_backward(P, coef.data_ptr<double>(), Z, g.data_ptr<double>(),
                   BackwardOut<scalar_t>{dX.data_ptr<scalar_t>(), nullptr, nullptr, nullptr});
  });
  return dX;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> k_norm2_cpu(const at::Tensor& M_in, const at::Tensor& X_in,
                                                           const c10::optional<at::Tensor>& gamma,
                                                           double gamma0, bool bias, c10::string_view activation) {
  if (cpu_aten_energies()) return k_norm2_aten(M_in, X_in, gamma, gamma0, bias, activation);
  RECORD_FUNCTION("leakycuda::cpu::k_norm2", std::vector<c10::IValue>());
  const KNormDims d = check_knorm_args(M_in, X_in, gamma, gamma0, bias, activation);
  const auto batch = X_in.sizes().slice(0, X_in.dim() - 2);
  std::vector<int64_t> zshape(batch.begin(), batch.end());
  zshape.push_back(d.p), zshape.push_back(d.m);
  const at::Tensor X = X_in.contiguous(), M = M_in.contiguous();
  at::Tensor val, gam, Z;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "k_norm2_cpu", [&] {
    Problem<scalar_t> P{Source::kKNorm, X.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), nullptr,
                        d.B, d.N, d.w, d.p, d.m, 1, bias, d.relu};
    ForwardOut f = knorm_forward(P, gamma, gamma0);
    val = finish_knorm_values(f.values, f.gamma).select(1, 0);
    gam = f.gamma, Z = f.Z;
  });
  return {val.to(X.scalar_type()).reshape(batch), gam.reshape(batch), Z.reshape(zshape)};
}

std::tuple<at::Tensor, at::Tensor> k_norm2_backward_cpu(const at::Tensor& grad, const at::Tensor& M_in,
                                                        const at::Tensor& X_in, const at::Tensor& Z_in,
                                                        const at::Tensor& gamma, bool bias,
                                                        c10::string_view activation) {
  if (cpu_aten_energies()) return k_norm2_backward_aten(grad, M_in, X_in, Z_in, gamma, bias, activation);
  RECORD_FUNCTION("leakycuda::cpu::k_norm2_backward", std::vector<c10::IValue>());
  const KNormDims d = check_knorm_backward_args(grad, M_in, X_in, Z_in, gamma, bias, activation);
  const at::Tensor X = X_in.contiguous(), M = M_in.contiguous(), Z = Z_in.reshape({d.B, d.p, d.m}).contiguous();
  const at::Tensor coef = grad.detach().to(at::kDouble).reshape(-1).contiguous();
  const at::Tensor g = gamma.reshape(-1).contiguous();
  at::Tensor dX = at::empty_like(X), dM = at::empty_like(M);
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "k_norm2_backward_cpu", [&] {
    Problem<scalar_t> P{Source::kKNorm, X.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), nullptr,
                        d.B, d.N, d.w, d.p, d.m, 1, bias, d.relu};
    knorm_backward(P, coef.data_ptr<double>(), Z, g.data_ptr<double>(),
                   BackwardOut<scalar_t>{dX.data_ptr<scalar_t>(), dM.data_ptr<scalar_t>(), nullptr, nullptr});
  });
  return {dM, dX};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
energies_cpu(const at::Tensor& xs_in, const at::Tensor& rho_in, double Lt,
             const c10::optional<at::Tensor>& gamma, double gamma0, bool bias, c10::string_view activation) {
  if (cpu_aten_energies()) return energies_aten(xs_in, rho_in, Lt, gamma, gamma0, bias, activation);
  RECORD_FUNCTION("leakycuda::cpu::energies", std::vector<c10::IValue>());
  const KNormDims d = check_energies_args(xs_in, rho_in, Lt, gamma, gamma0, bias, activation);
  const at::Tensor xs = xs_in.contiguous();
  const at::Tensor rho = rho_in.detach().to(at::kDouble).contiguous();
  at::Tensor gam, Z;
  std::array<at::Tensor, 5> e;
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "energies_cpu", [&] {
    Problem<scalar_t> P{Source::kEnergies, xs.data_ptr<scalar_t>(), nullptr, rho.data_ptr<double>(),
                        d.B, d.N, d.w, d.p, d.w, 2, bias, d.relu};
    ForwardOut f = knorm_forward(P, gamma, gamma0);
    gam = f.gamma, Z = f.Z;
    e = energies_from_values(f.values, gam, Lt);
  });
  const auto dt = xs.scalar_type();
  return {e[0].to(dt), e[1].to(dt), e[2].to(dt), e[3].to(dt), e[4].to(dt), gam, Z};
}

std::tuple<at::Tensor, at::Tensor> energies_backward_cpu(
    const at::Tensor& grad_coi, const at::Tensor& grad_kinetic, const at::Tensor& grad_potential,
    const at::Tensor& grad_hamiltonian, const at::Tensor& grad_rank, const at::Tensor& xs_in,
    const at::Tensor& rho_in, double Lt, const at::Tensor& Z_in, const at::Tensor& gamma, bool bias,
    c10::string_view activation) {
  if (cpu_aten_energies()) {
    return energies_backward_aten(grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank, xs_in,
                                  rho_in, Lt, Z_in, gamma, bias, activation);
  }
  RECORD_FUNCTION("leakycuda::cpu::energies_backward", std::vector<c10::IValue>());
  const std::array<at::Tensor, 5> grads = {grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank};
  const KNormDims d = check_energies_backward_args(grads, xs_in, rho_in, Lt, Z_in, gamma, bias, activation);
  const int64_t L = d.B;
  // coef[l] = (dLoss/dCOI_gamma(X_{l-1}), dLoss/d||D_l||^2_K) through coi, KE, potential, H and rank.
  const at::Tensor coef = energies_coef(grads, Lt).contiguous();
  const at::Tensor xs = xs_in.contiguous();
  const at::Tensor rho = rho_in.detach().to(at::kDouble).contiguous();
  const at::Tensor Z = Z_in.reshape({L, d.p, 2 * d.w}).contiguous();
  const at::Tensor g = gamma.reshape(-1).contiguous();
  at::Tensor dself = at::empty({L, d.N, d.w}, xs.options()), dnext = at::empty({L, d.N, d.w}, xs.options());
  at::Tensor drho = at::empty({L}, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "energies_backward_cpu", [&] {
    Problem<scalar_t> P{Source::kEnergies, xs.data_ptr<scalar_t>(), nullptr, rho.data_ptr<double>(),
                        d.B, d.N, d.w, d.p, d.w, 2, bias, d.relu};
    knorm_backward(P, coef.data_ptr<double>(), Z, g.data_ptr<double>(),
                   BackwardOut<scalar_t>{dself.data_ptr<scalar_t>(), nullptr, dnext.data_ptr<scalar_t>(),
                                         drho.data_ptr<double>()});
  });
  at::Tensor dxs = at::zeros_like(xs);
  dxs.narrow(0, 0, L).add_(dself);
  dxs.narrow(0, 1, L).add_(dnext);
  return {dxs, drho.to(rho_in.scalar_type())};
}

}  // namespace leakycuda
