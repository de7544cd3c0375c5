// CPU leaky-stack forward and backward: the layer loop runs here, GEMMs go through ATen, and the
// elementwise work of each layer is one fused at::parallel_for pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../leaky_stack.h"

namespace leakycuda {

namespace {

// Rows per task of the fused passes, and per partial sum of their reductions. The partials are
// summed in chunk order, so results do not depend on the number of threads.
inline int64_t rows_per_chunk(int64_t w) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(w, 1)); }

// Runs f(row_begin, row_end) -> double over fixed row chunks in parallel; returns the ordered sum.
template <typename F>
double parallel_rows_sum(int64_t N, int64_t w, const F& f) {
  const int64_t R = rows_per_chunk(w);
  const int64_t chunks = (N + R - 1) / R;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) partial[c] = f(c * R, std::min(N, (c + 1) * R));
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// S = sigma(X) = [relu(X), 1] as an [N, w+1] buffer; the ones column is written once.
template <typename scalar_t>
void fill_ones_column(scalar_t* S, int64_t N, int64_t w) {
  for (int64_t i = 0; i < N; ++i) S[i * (w + 1) + w] = scalar_t(1);
}

template <typename scalar_t>
void relu_into(const scalar_t* X, scalar_t* S, int64_t N, int64_t w) {
  at::parallel_for(0, N, rows_per_chunk(w), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* x = X + i * w;
      scalar_t* s = S + i * (w + 1);
      for (int64_t j = 0; j < w; ++j) s[j] = x[j] > scalar_t(0) ? x[j] : scalar_t(0);
    }
  });
}

// Forward epilogue of one layer: Xn = c*X + r*P (P = sigma(X) W^T, bias included) and S = sigma(Xn).
template <typename scalar_t>
void leak_relu_pass(const scalar_t* X, const scalar_t* P, scalar_t* Xn, scalar_t* S, int64_t N,
                    int64_t w, scalar_t c, scalar_t r) {
  at::parallel_for(0, N, rows_per_chunk(w), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* x = X + i * w;
      const scalar_t* p = P + i * w;
      scalar_t* xn = Xn + i * w;
      scalar_t* s = S + i * (w + 1);
      for (int64_t j = 0; j < w; ++j) {
        const scalar_t v = c * x[j] + r * p[j];
        xn[j] = v;
        s[j] = v > scalar_t(0) ? v : scalar_t(0);
      }
    }
  });
}

// Backward epilogue of one layer, in place on G: G <- c*G + r*U*1[X > 0] (+ extra, the loss
// gradient of X_{l-1} when every representation is an output). Returns <G_in, X> for drho.
template <typename scalar_t>
double mask_leak_pass(scalar_t* G, const scalar_t* U, const scalar_t* X, const scalar_t* extra,
                      int64_t N, int64_t w, scalar_t c, scalar_t r) {
  return parallel_rows_sum(N, w, [&](int64_t i0, int64_t i1) {
    double dot = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* g = G + i * w;
      const scalar_t* u = U + i * w;
      const scalar_t* x = X + i * w;
      const scalar_t* e = extra ? extra + i * w : nullptr;
      for (int64_t j = 0; j < w; ++j) {
        dot += double(g[j]) * double(x[j]);
        scalar_t v = c * g[j] + (x[j] > scalar_t(0) ? r * u[j] : scalar_t(0));
        if (e) v += e[j];
        g[j] = v;
      }
    }
    return dot;
  });
}

// dW_l = r * T, and returns <T, W_l> (in double, in a fixed order) for drho.
template <typename scalar_t>
double scale_and_dot(const scalar_t* T, const scalar_t* Wl, scalar_t* dWl, int64_t n, double r) {
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    dot += double(T[i]) * double(Wl[i]);
    dWl[i] = scalar_t(r * double(T[i]));
  }
  return dot;
}

// Runs layers [l0, l1) of the stack from X_{l0} = X. dest(l) names where X_l (l in (l0, l1]) goes;
// S and P are [N, w+1] / [N, w] work buffers (S's ones column already set).
template <typename scalar_t, typename Dest>
void forward_layers(const scalar_t* X, const at::Tensor& W, const scalar_t* rho, double Lt,
                    int64_t l0, int64_t l1, at::Tensor& S, at::Tensor& P, const Dest& dest) {
  const int64_t N = P.size(0), w = P.size(1);
  scalar_t* Sp = S.data_ptr<scalar_t>();
  relu_into(X, Sp, N, w);
  for (int64_t l = l0; l < l1; ++l) {
    at::mm_out(P, S, W[l].t());
    scalar_t* Xn = dest(l + 1);
    const double r = double(rho[l]);
    leak_relu_pass(X, P.data_ptr<scalar_t>(), Xn, Sp, N, w, scalar_t(1.0 - r * Lt), scalar_t(r));
    X = Xn;
  }
}

template <typename scalar_t>
void stack_forward(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho, double Lt,
                   bool return_all, int64_t k, at::Tensor& out, at::Tensor& states) {
  const int64_t L = W.size(0), N = x0.size(0), w = x0.size(1);
  const scalar_t* r = rho.data_ptr<scalar_t>();
  at::Tensor S = at::empty({N, w + 1}, x0.options());
  at::Tensor P = at::empty({N, w}, x0.options());
  fill_ones_column(S.data_ptr<scalar_t>(), N, w);
  if (return_all) {
    out[0].copy_(x0);
    scalar_t* base = out.data_ptr<scalar_t>();
    forward_layers<scalar_t>(base, W, r, Lt, 0, L, S, P, [&](int64_t l) { return base + l * N * w; });
    return;
  }
  // Every k-th representation lands in states, X_L in out, the rest alternate between two buffers.
  at::Tensor pingpong = at::empty({2, N, w}, x0.options());
  scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* pbase = pingpong.data_ptr<scalar_t>();
  const scalar_t* X = x0.data_ptr<scalar_t>();
  if (L > 0) {
    states[0].copy_(x0);
    X = sbase;
  }
  forward_layers<scalar_t>(X, W, r, Lt, 0, L, S, P, [&](int64_t l) {
    if (l == L) return out.data_ptr<scalar_t>();
    if (l % k == 0) return sbase + (l / k) * N * w;
    return pbase + (l % 2) * N * w;
  });
  if (L == 0) out.copy_(x0);
}

template <typename scalar_t>
void stack_backward(const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W,
                    const at::Tensor& rho, double Lt, int64_t k, at::Tensor& dx0, at::Tensor& dW,
                    at::Tensor& drho) {
  const int64_t L = W.size(0), w = W.size(1), N = dx0.size(0);
  const bool per_layer = grad.dim() == 3;
  const scalar_t* r = rho.data_ptr<scalar_t>();
  scalar_t* dr = drho.data_ptr<scalar_t>();
  // dx0 doubles as the running gradient G = dC/dX_l.
  dx0.copy_(per_layer ? grad[L] : grad);
  if (L == 0) return;
  scalar_t* G = dx0.data_ptr<scalar_t>();
  const scalar_t* gbase = per_layer ? grad.data_ptr<scalar_t>() : nullptr;

  at::Tensor S = at::empty({N, w + 1}, grad.options());
  at::Tensor P = at::empty({N, w}, grad.options());
  at::Tensor T = at::empty({w, w + 1}, grad.options());
  fill_ones_column(S.data_ptr<scalar_t>(), N, w);
  // seg[i] holds the recomputed X_{s+i} of the current segment (i >= 1); X_s comes from states.
  at::Tensor seg = at::empty({k > 1 ? k : 0, N, w}, grad.options());
  const scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* segp = seg.data_ptr<scalar_t>();
  const at::Tensor G_t = dx0;  // [N, w] view of the running gradient for the GEMMs

  for (int64_t j = num_states(L, k) - 1; j >= 0; --j) {
    const int64_t s = j * k, e = std::min(L, s + k);
    const scalar_t* Xs = sbase + j * N * w;
    auto X_at = [&](int64_t l) { return l == s ? Xs : segp + (l - s) * N * w; };
    if (e - s > 1) {
      forward_layers<scalar_t>(Xs, W, r, Lt, s, e - 1, S, P,
                               [&](int64_t l) { return segp + (l - s) * N * w; });
    }
    for (int64_t l = e; l > s; --l) {
      const scalar_t* Xp = X_at(l - 1);
      const at::Tensor Wl = W[l - 1];
      relu_into(Xp, S.data_ptr<scalar_t>(), N, w);
      at::mm_out(T, G_t.t(), S);  // T = G^T sigma(X_{l-1}), [w, w+1]
      const double rl = double(r[l - 1]);
      const double tw = scale_and_dot(T.data_ptr<scalar_t>(), Wl.data_ptr<scalar_t>(),
                                      dW[l - 1].data_ptr<scalar_t>(), w * (w + 1), rl);
      at::mm_out(P, G_t, Wl.narrow(1, 0, w));  // U = G V_l
      const scalar_t* extra = per_layer ? gbase + (l - 1) * N * w : nullptr;
      const double gx = mask_leak_pass(G, P.data_ptr<scalar_t>(), Xp, extra, N, w,
                                       scalar_t(1.0 - rl * Lt), scalar_t(rl));
      dr[l - 1] = scalar_t(tw - Lt * gx);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> leaky_stack_cpu(const at::Tensor& x0_in, const at::Tensor& W_in,
                                                   const at::Tensor& rho_in, double Lt,
                                                   bool return_all, int64_t checkpoint) {
  const auto d = check_stack_args(x0_in, W_in, rho_in, Lt, checkpoint, /*allow_half=*/false);
  check_rho_values(rho_in);
  // The GEMMs below write into preallocated buffers: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x0 = x0_in.contiguous(), W = W_in.contiguous(), rho = rho_in.contiguous();
  at::Tensor out = return_all ? at::empty({d.L + 1, d.N, d.w}, x0.options())
                              : at::empty({d.N, d.w}, x0.options());
  at::Tensor states = at::empty({return_all ? 0 : num_states(d.L, checkpoint), d.N, d.w}, x0.options());
  if (d.N == 0) return {out, states};
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "leaky_stack_cpu", [&] {
    stack_forward<scalar_t>(x0, W, rho, Lt, return_all, checkpoint, out, states);
  });
  return {out, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& states_in, const at::Tensor& W_in,
    const at::Tensor& rho_in, double Lt, int64_t checkpoint) {
  const auto d =
      check_stack_backward_args(grad_in, states_in, W_in, rho_in, Lt, checkpoint, /*allow_half=*/false);
  check_rho_values(rho_in);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_in.contiguous(), W = W_in.contiguous(), rho = rho_in.contiguous();
  const at::Tensor states = states_in.narrow(0, 0, num_states(d.L, checkpoint)).contiguous();
  at::Tensor dx0 = at::empty({d.N, d.w}, grad.options());
  at::Tensor dW = at::empty({d.L, d.w, d.w + 1}, grad.options());
  at::Tensor drho = at::empty({d.L}, grad.options());
  if (d.N == 0) return {dx0, dW.zero_(), drho.zero_()};
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "leaky_stack_backward_cpu", [&] {
    stack_backward<scalar_t>(grad, states, W, rho, Lt, checkpoint, dx0, dW, drho);
  });
  return {dx0, dW, drho};
}

}  // namespace leakycuda
