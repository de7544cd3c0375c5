// CPU leaky-stack forward and backward: the layer loop runs in C++ over cache-sized row chunks,
// GEMMs go straight to the BLAS torch links (ATen when it has none), and each layer's elementwise
// work is one fused pass over the chunk.
//
// The batch is split into a fixed set of row chunks (it depends on N and w only, never on the
// thread count). Forward: rows are independent, so each chunk runs through all layers on its own
// while its S = sigma(X) and GEMM output stay in cache. Backward: layer by layer, each chunk forms
// its share of T = G^T sigma(X_{l-1}) and of <G, X_{l-1}>; the shares are summed in chunk order,
// so dW and drho are bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../leaky_stack.h"

// BLAS from the library torch links (MKL or OpenBLAS export the Fortran names); weak, so a torch
// without them still loads this extension and the GEMMs go through ATen instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace leakycuda {

namespace {

// The BLAS path is on when torch exports both symbols, unless LEAKYCUDA_CPU_ATEN_GEMM=1 (tests use
// it to cover the ATen path too).
bool use_blas() {
  static const bool on = sgemm_ && dgemm_ && !std::getenv("LEAKYCUDA_CPU_ATEN_GEMM");
  return on;
}

// Row-major C[M,N] = op(A) op(B) (beta 0) on raw pointers, with leading dimensions lda/ldb/ldc:
// the column-major BLAS call on the transposed problem. Returns false when BLAS is off; the
// caller then uses at::mm_out. Small per-chunk GEMMs cost a few microseconds less this way.
template <typename scalar_t>
bool gemm_rm(char ta, char tb, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
             const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const scalar_t one = 1, zero = 0;
  if (!use_blas()) return false;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&tb, &ta, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
  } else {
    dgemm_(&tb, &ta, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
  }
  return true;
}

// A fixed partition of N rows into `count` chunks of `rows` rows (the last may be shorter): about
// 16K elements per chunk, and a multiple of 8 chunks when there are several, so that 2, 4 or 8
// threads share the work evenly.
struct RowChunks {
  int64_t rows, count;
  int64_t begin(int64_t c) const { return c * rows; }
  int64_t size(int64_t c, int64_t N) const { return std::min(N, (c + 1) * rows) - c * rows; }
};

constexpr int64_t kChunkElems = 16384, kChunkMult = 8;

RowChunks row_chunks(int64_t N, int64_t w) {
  const int64_t target = std::max<int64_t>(8, kChunkElems / std::max<int64_t>(w, 1));
  int64_t count = (N + target - 1) / target;
  if (count > 1) count = std::min(N, (count + kChunkMult - 1) / kChunkMult * kChunkMult);
  count = std::max<int64_t>(count, 1);
  const int64_t rows = std::max<int64_t>(1, (N + count - 1) / count);
  return {rows, (N + rows - 1) / rows};
}

// Asks Linux for transparent huge pages on a large fresh buffer (before it is first written), so
// that filling the saved representations takes ~1/500 as many page faults; elsewhere a no-op.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (t.nbytes() < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Per-chunk [rows, cols] views of a row-major [N, cols] buffer, made once so the layer loops
// create no tensors.
std::vector<at::Tensor> chunk_views(const at::Tensor& buf, const RowChunks& ch) {
  std::vector<at::Tensor> v;
  const int64_t N = buf.size(0);
  for (int64_t c = 0; c < ch.count; ++c) v.push_back(buf.narrow(0, ch.begin(c), ch.size(c, N)));
  return v;
}

// S = sigma(X) = [act(X), 1] as an [n, w+1] buffer; the ones column is written once.
template <typename scalar_t>
void fill_ones_column(scalar_t* S, int64_t n, int64_t w) {
  for (int64_t i = 0; i < n; ++i) S[i * (w + 1) + w] = scalar_t(1);
}

// relu as torch.relu computes it: NaN stays NaN (x < 0 is false for NaN).
template <typename scalar_t>
inline scalar_t relu(scalar_t x) {
  return x < scalar_t(0) ? scalar_t(0) : x;
}

// The activation of sigma: relu, or the identity for kLinear.
template <Activation kAct, typename scalar_t>
inline scalar_t act(scalar_t x) {
  if constexpr (kAct == Activation::kRelu) return relu(x);
  else return x;
}

template <Activation kAct, typename scalar_t>
void act_rows(const scalar_t* __restrict__ X, scalar_t* __restrict__ S, int64_t n, int64_t w) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* x = X + i * w;
    scalar_t* s = S + i * (w + 1);
    for (int64_t j = 0; j < w; ++j) s[j] = act<kAct>(x[j]);
  }
}

// Forward epilogue of one layer: Xn = c*X + r*P (P = sigma(X) W^T, bias included) and S = sigma(Xn).
template <Activation kAct, typename scalar_t>
void leak_act_rows(const scalar_t* __restrict__ X, const scalar_t* __restrict__ P, scalar_t* __restrict__ Xn,
                    scalar_t* __restrict__ S, int64_t n,
                    int64_t w, scalar_t c, scalar_t r) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* x = X + i * w;
    const scalar_t* p = P + i * w;
    scalar_t* xn = Xn + i * w;
    scalar_t* s = S + i * (w + 1);
    for (int64_t j = 0; j < w; ++j) {
      const scalar_t v = c * x[j] + r * p[j];
      xn[j] = v;
      s[j] = act<kAct>(v);
    }
  }
}

// Sums of products in double over kLanes independent accumulators (element i goes to lane i % kLanes,
// lanes added in order at the end): vectorizes without reordering anything, so it is reproducible.
constexpr int64_t kLanes = 8;

inline double sum_lanes(const double* acc) {
  double total = 0.0;
  for (int64_t k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// relu's backward as torch computes it (threshold_backward on relu's output): u unless x <= 0, else
// +0, so the gradient passes where x is NaN. A bit mask instead of a branch (compilers keep a
// select of a loaded value as a branch, which mispredicts on relu patterns and blocks vectorization).
template <typename scalar_t>
inline scalar_t keep_if_positive(scalar_t x, scalar_t u) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  bits_t b;
  std::memcpy(&b, &u, sizeof b);
  b &= bits_t(0) - bits_t(!(x <= scalar_t(0)));
  std::memcpy(&u, &b, sizeof b);
  return u;
}

// <A, B> over `size` elements in double with the lane accumulators.
template <typename scalar_t>
double dot_lanes(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B, int64_t size) {
  double acc[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= size; i0 += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(A[i0 + k]) * double(B[i0 + k]);
  for (int64_t k = 0; i0 + k < size; ++k) acc[k] += double(A[i0 + k]) * double(B[i0 + k]);
  return sum_lanes(acc);
}

// Whether `size` values are all finite: sum of v * 0 in lanes (NaN exactly when some v is NaN or
// inf), so it vectorizes.
template <typename scalar_t>
bool all_finite(const scalar_t* __restrict__ V, int64_t size) {
  double acc[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= size; i0 += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) acc[k] += double(V[i0 + k]) * 0.0;
  for (int64_t k = 0; i0 + k < size; ++k) acc[k] += double(V[i0 + k]) * 0.0;
  return sum_lanes(acc) == 0.0;
}

// Backward epilogue of one layer, in place on G: G <- c*G + r*act'(X)*U, act'(X) = 1[!(X <= 0)] for
// relu and 1 for kLinear (+ extra, the loss gradient of X_{l-1} when every representation is an
// output). A branch-free loop over the cached chunk, so it vectorizes.
template <Activation kAct, bool kExtra, typename scalar_t>
void mask_leak_update(scalar_t* __restrict__ G, const scalar_t* __restrict__ U, const scalar_t* __restrict__ X,
                      const scalar_t* __restrict__ extra, int64_t size, scalar_t c, scalar_t r) {
  for (int64_t i = 0; i < size; ++i) {
    scalar_t v;
    if constexpr (kAct == Activation::kRelu) v = c * G[i] + r * keep_if_positive(X[i], U[i]);
    else v = c * G[i] + r * U[i];
    if constexpr (kExtra) v += extra[i];
    G[i] = v;
  }
}

template <Activation kAct, typename scalar_t>
void mask_leak_rows(scalar_t* G, const scalar_t* U, const scalar_t* X, const scalar_t* extra, int64_t n,
                    int64_t w, scalar_t c, scalar_t r) {
  if (extra) mask_leak_update<kAct, true>(G, U, X, extra, n * w, c, r);
  else mask_leak_update<kAct, false>(G, U, X, extra, n * w, c, r);
}

// <G, S W_l^T> over one chunk (G [n, w], S [n, w+1]), the GEMM into a scratch buffer: the form of
// drho's first term that the reference computes, for chunks holding NaN/inf.
template <typename scalar_t>
double dot_G_P(const scalar_t* G, const scalar_t* S, const scalar_t* Wl, int64_t n, int64_t w,
               const at::Tensor& Wlt) {
  at::Tensor P = at::empty({n, w}, Wlt.options());
  if (!gemm_rm<scalar_t>('N', 'T', n, w, w + 1, S, w + 1, Wl, w + 1, P.data_ptr<scalar_t>(), w)) {
    const auto opt = Wlt.options();
    at::mm_out(P, at::from_blob(const_cast<scalar_t*>(S), {n, w + 1}, opt), Wlt);
  }
  return dot_lanes(G, P.data_ptr<scalar_t>(), n * w);
}

// dW_l = r * sum_c Tp[c] over elements [i0, i1) (chunks in order); returns <sum_c Tp[c], W_l> there.
template <typename scalar_t>
double reduce_dW(const scalar_t* __restrict__ Tp, int64_t count, int64_t stride, const scalar_t* __restrict__ Wl,
                 scalar_t* __restrict__ dWl, int64_t i0, int64_t i1, double r) {
  double acc[kLanes] = {};
  for (int64_t b = i0; b < i1; b += kLanes) {
    const int64_t m = std::min(kLanes, i1 - b);
    double t[kLanes] = {};
    for (int64_t c = 0; c < count; ++c)
      for (int64_t k = 0; k < m; ++k) t[k] += double(Tp[c * stride + b + k]);
    for (int64_t k = 0; k < m; ++k) {
      acc[k] += t[k] * double(Wl[b + k]);
      dWl[b + k] = scalar_t(r * t[k]);
    }
  }
  return sum_lanes(acc);
}

// The stack's inputs and the per-chunk work buffers shared by forward and backward.
template <Activation kAct, typename scalar_t>
struct Stack {
  int64_t L, N, w;
  double Lt;
  const scalar_t* rho;
  const scalar_t* Wp;
  RowChunks ch;
  std::vector<at::Tensor> Wt, V;  // per layer: W_l^T [w+1, w] and V_l [w, w] (views)
  at::Tensor S, P;                // [N, w+1] sigma(X) and [N, w] GEMM output, split by chunk
  std::vector<at::Tensor> S_c, P_c;

  Stack(const at::Tensor& W, const at::Tensor& rho_t, double Lt_, int64_t N_, const at::TensorOptions& opt)
      : L(W.size(0)), N(N_), w(W.size(1)), Lt(Lt_), rho(rho_t.data_ptr<scalar_t>()), Wp(W.data_ptr<scalar_t>()), ch(row_chunks(N_, W.size(1))) {
    for (int64_t l = 0; l < L; ++l) {
      Wt.push_back(W[l].t());
      V.push_back(W[l].narrow(1, 0, w));
    }
    S = at::empty({N, w + 1}, opt);
    P = at::empty({N, w}, opt);
    fill_ones_column(S.data_ptr<scalar_t>(), N, w);
    S_c = chunk_views(S, ch);
    P_c = chunk_views(P, ch);
  }

  // Runs layers [l0, l1) for chunk c from X_{l0} (rows of the chunk at X); dest(l) is the base of
  // the [N, w] array that receives X_l.
  template <typename Dest>
  void forward_chunk(int64_t c, const scalar_t* X, int64_t l0, int64_t l1, const Dest& dest) {
    const int64_t r0 = ch.begin(c), n = ch.size(c, N);
    scalar_t* Sp = S.data_ptr<scalar_t>() + r0 * (w + 1);
    const scalar_t* Pp = P.data_ptr<scalar_t>() + r0 * w;
    act_rows<kAct>(X, Sp, n, w);
    for (int64_t l = l0; l < l1; ++l) {
      if (!gemm_rm<scalar_t>('N', 'T', n, w, w + 1, Sp, w + 1, Wp + l * w * (w + 1), w + 1,
                             P.data_ptr<scalar_t>() + r0 * w, w))
        at::mm_out(P_c[c], S_c[c], Wt[l]);
      scalar_t* Xn = dest(l + 1) + r0 * w;
      const double r = double(rho[l]);
      leak_act_rows<kAct>(X, Pp, Xn, Sp, n, w, scalar_t(1.0 - r * Lt), scalar_t(r));
      X = Xn;
    }
  }

  // forward_chunk for every chunk in parallel, X0 the base of the [N, w] array holding X_{l0}.
  template <typename Dest>
  void forward(const scalar_t* X0, int64_t l0, int64_t l1, const Dest& dest) {
    at::parallel_for(0, ch.count, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) forward_chunk(c, X0 + ch.begin(c) * w, l0, l1, dest);
    });
  }
};

template <Activation kAct, typename scalar_t>
void stack_forward(const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho, double Lt,
                   bool return_all, int64_t k, at::Tensor& out, at::Tensor& states) {
  const int64_t N = x0.size(0), w = x0.size(1);
  Stack<kAct, scalar_t> st(W, rho, Lt, N, x0.options());
  const int64_t L = st.L;
  if (return_all) {
    out[0].copy_(x0);
    scalar_t* base = out.data_ptr<scalar_t>();
    st.forward(base, 0, L, [&](int64_t l) { return base + l * N * w; });
    return;
  }
  if (L == 0) {
    out.copy_(x0);
    return;
  }
  // Every k-th representation lands in states, X_L in out, the rest alternate between two buffers.
  at::Tensor pingpong = at::empty({k > 1 ? 2 : 0, N, w}, x0.options());
  scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* pbase = pingpong.data_ptr<scalar_t>();
  states[0].copy_(x0);
  st.forward(sbase, 0, L, [&](int64_t l) {
    if (l == L) return out.data_ptr<scalar_t>();
    if (l % k == 0) return sbase + (l / k) * N * w;
    return pbase + (l % 2) * N * w;
  });
}

template <Activation kAct, typename scalar_t>
void stack_backward(const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W,
                    const at::Tensor& rho, double Lt, int64_t k, at::Tensor& dx0, at::Tensor& dW,
                    at::Tensor& drho) {
  const int64_t N = dx0.size(0), w = W.size(1);
  const bool per_layer = grad.dim() == 3;
  // dx0 doubles as the running gradient G = dC/dX_l.
  dx0.copy_(per_layer ? grad[W.size(0)] : grad);
  if (W.size(0) == 0) return;
  Stack<kAct, scalar_t> st(W, rho, Lt, N, grad.options());
  const int64_t L = st.L, count = st.ch.count;
  scalar_t* G = dx0.data_ptr<scalar_t>();
  const scalar_t* gbase = per_layer ? grad.data_ptr<scalar_t>() : nullptr;
  std::vector<at::Tensor> G_c = chunk_views(dx0, st.ch), G_cT, T_c;
  // T_c[c] = chunk c's share of T = G^T sigma(X_{l-1}); gx[c] its share of <G, X_{l-1}>.
  at::Tensor Tp = at::empty({count, w, w + 1}, grad.options());
  for (int64_t c = 0; c < count; ++c) G_cT.push_back(G_c[c].t()), T_c.push_back(Tp[c]);
  std::vector<double> gx(count), gp(count);
  std::vector<char> exact(count);

  // seg[i] holds the recomputed X_{s+i} of the current segment (i >= 1); X_s comes from states.
  at::Tensor seg = at::empty({k > 1 ? k : 0, N, w}, grad.options());
  advise_huge_pages(seg);
  const scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* segp = seg.data_ptr<scalar_t>();
  scalar_t* dWp = dW.data_ptr<scalar_t>();
  const scalar_t* Wp = W.data_ptr<scalar_t>();
  const scalar_t* Tpp = Tp.data_ptr<scalar_t>();
  const int64_t WW = w * (w + 1);

  for (int64_t j = num_states(L, k) - 1; j >= 0; --j) {
    const int64_t s = j * k, e = std::min(L, s + k);
    const scalar_t* Xs = sbase + j * N * w;
    if (e - s > 1) st.forward(Xs, s, e - 1, [&](int64_t l) { return segp + (l - s) * N * w; });
    for (int64_t l = e; l > s; --l) {
      const scalar_t* Xp = l - 1 == s ? Xs : segp + (l - 1 - s) * N * w;
      const double rl = double(st.rho[l - 1]);
      const scalar_t* extra = per_layer ? gbase + (l - 1) * N * w : nullptr;
      const bool W_finite = all_finite(Wp + (l - 1) * WW, WW);
      at::parallel_for(0, count, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = st.ch.begin(c), n = st.ch.size(c, N);
          act_rows<kAct>(Xp + r0 * w, st.S.template data_ptr<scalar_t>() + r0 * (w + 1), n, w);
          scalar_t* Sc = st.S.template data_ptr<scalar_t>() + r0 * (w + 1);
          scalar_t* Uc = st.P.template data_ptr<scalar_t>() + r0 * w;
          if (!gemm_rm<scalar_t>('T', 'N', w, w + 1, n, G + r0 * w, w, Sc, w + 1, T_c[c].template data_ptr<scalar_t>(), w + 1))
            at::mm_out(T_c[c], G_cT[c], st.S_c[c]);
          if (!gemm_rm<scalar_t>('N', 'N', n, w, w, G + r0 * w, w, Wp + (l - 1) * WW, w + 1, Uc, w))
            at::mm_out(st.P_c[c], G_c[c], st.V[l - 1]);  // U = G V_l
          gx[c] = dot_lanes(G + r0 * w, Xp + r0 * w, n * w);
          // drho_l = <G, P> - Lt <G, X_{l-1}> (P = sigma(X_{l-1}) W_l^T) is formed below as <T, W_l> -
          // Lt <G, X_{l-1}>, equal in exact arithmetic; with NaN/inf in the chunk's G or X (then gx is
          // not finite) or in W_l the two forms can differ (inf vs NaN), so such a chunk forms <G, P>
          // itself, as the reference does.
          exact[c] = !std::isfinite(gx[c]) || !W_finite;
          if (exact[c]) gp[c] = dot_G_P(G + r0 * w, Sc, Wp + (l - 1) * WW, n, w, st.Wt[l - 1]);
          mask_leak_rows<kAct>(G + r0 * w, Uc, Xp + r0 * w, extra ? extra + r0 * w : nullptr, n, w,
                         scalar_t(1.0 - rl * Lt), scalar_t(rl));
        }
      });
      // dW_l = rho_l * sum_c Tp[c] and <T, W_l>, over fixed element blocks, chunks in order.
      const int64_t B = 4096, nb = (WW + B - 1) / B;
      std::vector<double> tw(nb);
      scalar_t* dWl = dWp + (l - 1) * WW;
      const scalar_t* Wl = Wp + (l - 1) * WW;
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          tw[b] = reduce_dW(Tpp, count, WW, Wl, dWl, b * B, std::min(WW, (b + 1) * B), rl);
      });
      double twsum = 0.0, gxsum = 0.0, gpsum = 0.0;
      bool any_exact = false;
      for (double v : tw) twsum += v;
      for (double v : gx) gxsum += v;
      // Chunks without NaN/inf add finite amounts, which leave a non-finite sum as it is.
      for (int64_t c = 0; c < count; ++c)
        if (exact[c]) any_exact = true, gpsum += gp[c];
      drho.data_ptr<scalar_t>()[l - 1] = scalar_t((any_exact ? gpsum : twsum) - Lt * gxsum);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> leaky_stack_cpu(const at::Tensor& x0_in, const at::Tensor& W_in,
                                                   const at::Tensor& rho_in, double Lt,
                                                   bool return_all, int64_t checkpoint,
                                                   c10::string_view activation,
                                                   const c10::optional<at::Tensor>& model_Lt) {
  const auto d = check_stack_args(x0_in, W_in, rho_in, Lt, checkpoint, activation, model_Lt,
                                  /*allow_half=*/false);
  TORCH_CHECK_VALUE(!d.models, "leaky_stack on CPU: B models are not implemented yet");
  check_rho_values(rho_in);
  check_model_Lt_values(model_Lt);
  // The GEMMs below write into preallocated buffers: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x0 = x0_in.contiguous(), W = W_in.contiguous(), rho = rho_in.contiguous();
  at::Tensor out, states;
  std::tie(out, states) = empty_stack_outputs(d, return_all, checkpoint, x0.options());
  if (d.N == 0) return {out, states};
  advise_huge_pages(out);
  advise_huge_pages(states);
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "leaky_stack_cpu", [&] {
    visit_activation(d.act, [&](auto kAct) {
      stack_forward<decltype(kAct)::value, scalar_t>(x0, W, rho, Lt, return_all, checkpoint, out, states);
    });
  });
  return {out, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& states_in, const at::Tensor& W_in,
    const at::Tensor& rho_in, double Lt, int64_t checkpoint, c10::string_view activation,
    const c10::optional<at::Tensor>& model_Lt) {
  const auto d = check_stack_backward_args(grad_in, states_in, W_in, rho_in, Lt, checkpoint, activation,
                                           model_Lt, /*allow_half=*/false);
  TORCH_CHECK_VALUE(!d.models, "leaky_stack_backward on CPU: B models are not implemented yet");
  check_rho_values(rho_in);
  check_model_Lt_values(model_Lt);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_in.contiguous(), W = W_in.contiguous(), rho = rho_in.contiguous();
  const at::Tensor states = states_in.narrow(0, 0, num_states(d.L, checkpoint)).contiguous();
  at::Tensor dx0, dW, drho;
  std::tie(dx0, dW, drho) = empty_stack_grads(d, grad.options());
  if (d.N == 0) return {dx0, dW.zero_(), drho.zero_()};
  advise_huge_pages(dW);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "leaky_stack_backward_cpu", [&] {
    visit_activation(d.act, [&](auto kAct) {
      stack_backward<decltype(kAct)::value, scalar_t>(grad, states, W, rho, Lt, checkpoint, dx0, dW, drho);
    });
  });
  return {dx0, dW, drho};
}

}  // namespace leakycuda
