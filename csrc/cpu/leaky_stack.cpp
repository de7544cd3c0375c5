// CPU leaky-stack forward and backward, for one model or B models in one call: the layer loop runs
// in C++ over cache-sized row chunks, GEMMs go straight to the BLAS torch links (ATen when it has
// none), and each layer's elementwise work is one fused pass over the chunk. The activation of
// sigma (relu or linear) is a template parameter of the same code.
//
// Each model's batch is split into a fixed set of row chunks (it depends on N and w only, never on
// the thread count); the tasks are the (model, chunk) pairs, run by one parallel_for. Forward: rows
// are independent, so each task runs its chunk through all layers on its own while its
// S = sigma(X) and GEMM output stay in cache. Backward: layer by layer (the models' layers in step,
// they all have L), each task forms its chunk's share of T = G^T sigma(X_{l-1}) and of
// <G, X_{l-1}>; each model's shares are summed in chunk order, so dW and drho are bitwise
// reproducible and every model's result is the one it gets alone.
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
// the column-major BLAS call on the transposed problem (small per-chunk GEMMs cost a few
// microseconds less this way), or at::mm_out on views of the same memory when BLAS is off.
template <typename scalar_t>
void gemm_rm(char ta, char tb, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
             const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  if (use_blas()) {
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const scalar_t one = 1, zero = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&tb, &ta, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
    } else {
      dgemm_(&tb, &ta, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
    }
    return;
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  // op(X) of a row-major [rows, cols] operand stored with leading dimension ld.
  auto view = [&](const scalar_t* p, char t, int64_t rows, int64_t cols, int64_t ld) {
    const bool tr = t == 'T';
    at::Tensor v = at::from_blob(const_cast<scalar_t*>(p), {tr ? cols : rows, tr ? rows : cols}, {ld, 1}, opt);
    return tr ? v.t() : v;
  };
  at::Tensor out = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  at::mm_out(out, view(A, ta, M, K, lda), view(B, tb, K, N, ldb));
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

// <G, S W_l^T> over one chunk (G [n, w], S [n, w+1]), the GEMM into P [n, w]: the form of drho's
// first term that the reference computes, for chunks holding NaN/inf.
template <typename scalar_t>
double dot_G_P(const scalar_t* G, const scalar_t* S, const scalar_t* Wl, scalar_t* P, int64_t n, int64_t w) {
  gemm_rm<scalar_t>('N', 'T', n, w, w + 1, S, w + 1, Wl, w + 1, P, w);
  return dot_lanes(G, P, n * w);
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

// The inputs of B stacks (B = 1 for one model) and the per-chunk work buffers shared by forward
// and backward. Arrays of representations are [B, *, N, w] (one model: a leading 1), addressed by
// base pointers: a function of (b) or (b, l) returns model b's [N, w] block.
template <Activation kAct, typename scalar_t>
struct Stack {
  int64_t B, L, N, w;
  std::vector<double> Lt;  // per model
  const scalar_t* rho;     // [B, L]
  const scalar_t* Wp;      // [B, L, w, w+1]
  RowChunks ch;
  at::Tensor S, P;  // [B, N, w+1] sigma(X) and [B, N, w] GEMM output, split by chunk

  Stack(const StackDims& d, const at::Tensor& W, const at::Tensor& rho_t, double Lt_,
        const c10::optional<at::Tensor>& model_Lt, const at::TensorOptions& opt)
      : B(d.B), L(d.L), N(d.N), w(d.w), Lt(d.B, Lt_), rho(rho_t.data_ptr<scalar_t>()),
        Wp(W.data_ptr<scalar_t>()), ch(row_chunks(d.N, d.w)) {
    if (model_Lt.has_value()) {
      const at::Tensor t = model_Lt->to(at::kCPU).contiguous();
      std::copy(t.data_ptr<double>(), t.data_ptr<double>() + B, Lt.begin());
    }
    S = at::empty({B, N, w + 1}, opt);
    P = at::empty({B, N, w}, opt);
    fill_ones_column(S.data_ptr<scalar_t>(), B * N, w);
  }

  int64_t tasks() const { return B * ch.count; }
  const scalar_t* W(int64_t b, int64_t l) const { return Wp + (b * L + l) * w * (w + 1); }
  double r(int64_t b, int64_t l) const { return double(rho[b * L + l]); }
  // Chunk c of model b in a [B, N, cols] buffer.
  template <typename T>
  T* rows(T* base, int64_t b, int64_t c, int64_t cols) const {
    return base + (b * N + ch.begin(c)) * cols;
  }

  // Runs layers [l0, l1) for chunk c of model b from X_{l0} (rows of the chunk at X); dest(b, l) is
  // the base of model b's [N, w] array that receives X_l.
  template <typename Dest>
  void forward_chunk(int64_t b, int64_t c, const scalar_t* X, int64_t l0, int64_t l1, const Dest& dest) {
    const int64_t r0 = ch.begin(c), n = ch.size(c, N);
    scalar_t* Sp = rows(S.data_ptr<scalar_t>(), b, c, w + 1);
    scalar_t* Pp = rows(P.data_ptr<scalar_t>(), b, c, w);
    act_rows<kAct>(X, Sp, n, w);
    for (int64_t l = l0; l < l1; ++l) {
      gemm_rm<scalar_t>('N', 'T', n, w, w + 1, Sp, w + 1, W(b, l), w + 1, Pp, w);
      scalar_t* Xn = dest(b, l + 1) + r0 * w;
      const double rl = r(b, l);
      leak_act_rows<kAct>(X, Pp, Xn, Sp, n, w, scalar_t(1.0 - rl * Lt[b]), scalar_t(rl));
      X = Xn;
    }
  }

  // forward_chunk for every (model, chunk) task in parallel; X0(b) is the base of model b's [N, w]
  // array holding X_{l0}.
  template <typename Src, typename Dest>
  void forward(const Src& X0, int64_t l0, int64_t l1, const Dest& dest) {
    at::parallel_for(0, tasks(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / ch.count, c = t % ch.count;
        forward_chunk(b, c, X0(b) + ch.begin(c) * w, l0, l1, dest);
      }
    });
  }
};

// x0 [B, N, w] -> out [B, N, w] or [B, L+1, N, w] (return_all), states [B, ceil(L/k), N, w].
template <Activation kAct, typename scalar_t>
void stack_forward(const StackDims& d, const at::Tensor& x0, const at::Tensor& W, const at::Tensor& rho,
                   double Lt, const c10::optional<at::Tensor>& model_Lt, bool return_all, int64_t k,
                   at::Tensor& out, at::Tensor& states) {
  const int64_t L = d.L, Nw = d.N * d.w;
  const scalar_t* xbase = x0.data_ptr<scalar_t>();
  auto x0_of = [&](int64_t b) { return xbase + b * Nw; };
  if (return_all) {
    out.select(1, 0).copy_(x0);
    if (L == 0) return;
    Stack<kAct, scalar_t> st(d, W, rho, Lt, model_Lt, x0.options());
    scalar_t* base = out.data_ptr<scalar_t>();
    st.forward(x0_of, 0, L, [&](int64_t b, int64_t l) { return base + (b * (L + 1) + l) * Nw; });
    return;
  }
  if (L == 0) {
    out.copy_(x0);
    return;
  }
  Stack<kAct, scalar_t> st(d, W, rho, Lt, model_Lt, x0.options());
  // Every k-th representation lands in states, X_L in out, the rest alternate between two buffers.
  const int64_t S = states.size(1);
  at::Tensor pingpong = at::empty({d.B, k > 1 ? 2 : 0, d.N, d.w}, x0.options());
  scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* pbase = pingpong.data_ptr<scalar_t>();
  scalar_t* obase = out.data_ptr<scalar_t>();
  states.select(1, 0).copy_(x0);
  st.forward([&](int64_t b) { return sbase + b * S * Nw; }, 0, L, [&](int64_t b, int64_t l) {
    if (l == L) return obase + b * Nw;
    if (l % k == 0) return sbase + (b * S + l / k) * Nw;
    return pbase + (b * 2 + l % 2) * Nw;
  });
}

// grad [B, N, w] (of X_L) or [B, L+1, N, w] (of every X_l), states [B, ceil(L/k), N, w] ->
// dx0 [B, N, w], dW [B, L, w, w+1], drho [B, L].
template <Activation kAct, typename scalar_t>
void stack_backward(const StackDims& d, const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W,
                    const at::Tensor& rho, double Lt, const c10::optional<at::Tensor>& model_Lt, int64_t k,
                    at::Tensor& dx0, at::Tensor& dW, at::Tensor& drho) {
  const int64_t L = d.L, N = d.N, w = d.w, Nw = N * w, WW = w * (w + 1);
  const bool per_layer = grad.dim() == 4;
  // dx0 doubles as the running gradient G = dC/dX_l.
  dx0.copy_(per_layer ? grad.select(1, L) : grad);
  if (L == 0) return;
  Stack<kAct, scalar_t> st(d, W, rho, Lt, model_Lt, grad.options());
  const int64_t count = st.ch.count, tasks = st.tasks();
  scalar_t* G = dx0.data_ptr<scalar_t>();
  const scalar_t* gbase = per_layer ? grad.data_ptr<scalar_t>() : nullptr;
  // Tp[t] = task t's share of T = G^T sigma(X_{l-1}); gx[t] its share of <G, X_{l-1}>; gp[t] its
  // <G, P> when it holds NaN/inf (exact[t]).
  at::Tensor Tp = at::empty({tasks, w, w + 1}, grad.options());
  std::vector<double> gx(tasks), gp(tasks);
  std::vector<char> exact(tasks), W_finite(d.B);
  // seg[b, i] holds model b's recomputed X_{s+i} of the current segment (i >= 1); X_s is in states.
  at::Tensor seg = at::empty({d.B, k > 1 ? k : 0, N, w}, grad.options());
  advise_huge_pages(seg);
  const int64_t S = states.size(1);
  const scalar_t* sbase = states.data_ptr<scalar_t>();
  scalar_t* segp = seg.data_ptr<scalar_t>();
  scalar_t* Tpp = Tp.data_ptr<scalar_t>();
  scalar_t* Sbase = st.S.template data_ptr<scalar_t>();
  scalar_t* Pbase = st.P.template data_ptr<scalar_t>();
  scalar_t* dWp = dW.data_ptr<scalar_t>();
  // dW_l's reduction runs over fixed blocks of its w(w+1) elements.
  const int64_t block = 4096, nb = (WW + block - 1) / block;
  std::vector<double> tw(d.B * nb);

  for (int64_t j = num_states(L, k) - 1; j >= 0; --j) {
    const int64_t s = j * k, e = std::min(L, s + k);
    auto Xs = [&](int64_t b) { return sbase + (b * S + j) * Nw; };
    auto Xseg = [&](int64_t b, int64_t l) { return segp + (b * k + (l - s)) * Nw; };
    if (e - s > 1) st.forward(Xs, s, e - 1, Xseg);
    for (int64_t l = e; l > s; --l) {
      for (int64_t b = 0; b < d.B; ++b) W_finite[b] = all_finite(st.W(b, l - 1), WW);
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / count, c = t % count, n = st.ch.size(c, N), r0 = st.ch.begin(c);
          const scalar_t* Xp = (l - 1 == s ? Xs(b) : Xseg(b, l - 1)) + r0 * w;
          scalar_t* Gc = st.rows(G, b, c, w);
          scalar_t* Sc = st.rows(Sbase, b, c, w + 1);
          scalar_t* Uc = st.rows(Pbase, b, c, w);
          const scalar_t* Wl = st.W(b, l - 1);
          const double rl = st.r(b, l - 1);
          act_rows<kAct>(Xp, Sc, n, w);
          gemm_rm<scalar_t>('T', 'N', w, w + 1, n, Gc, w, Sc, w + 1, Tpp + t * WW, w + 1);
          gx[t] = dot_lanes(Gc, Xp, n * w);
          // drho_l = <G, P> - Lt <G, X_{l-1}> (P = sigma(X_{l-1}) W_l^T) is formed below as
          // <T, W_l> - Lt <G, X_{l-1}>, equal in exact arithmetic; with NaN/inf in the chunk's G or
          // X (then gx is not finite) or in W_l the two forms can differ (inf vs NaN), so such a
          // chunk forms <G, P> itself, as the reference does (in U's buffer, before U).
          exact[t] = !std::isfinite(gx[t]) || !W_finite[b];
          if (exact[t]) gp[t] = dot_G_P(Gc, Sc, Wl, Uc, n, w);
          gemm_rm<scalar_t>('N', 'N', n, w, w, Gc, w, Wl, w + 1, Uc, w);  // U = G V_l
          const scalar_t* extra = per_layer ? gbase + (b * (L + 1) + l - 1) * Nw + r0 * w : nullptr;
          mask_leak_rows<kAct>(Gc, Uc, Xp, extra, n, w, scalar_t(1.0 - rl * st.Lt[b]), scalar_t(rl));
        }
      });
      // dW_l = rho_l * sum_c Tp[c] and <T, W_l>, per model over fixed element blocks, chunks in order.
      at::parallel_for(0, d.B * nb, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t b = q / nb, i = q % nb;
          tw[q] = reduce_dW(Tpp + b * count * WW, count, WW, st.W(b, l - 1), dWp + (b * L + l - 1) * WW,
                            i * block, std::min(WW, (i + 1) * block), st.r(b, l - 1));
        }
      });
      for (int64_t b = 0; b < d.B; ++b) {
        double twsum = 0.0, gxsum = 0.0, gpsum = 0.0;
        bool any_exact = false;
        for (int64_t i = 0; i < nb; ++i) twsum += tw[b * nb + i];
        for (int64_t c = 0; c < count; ++c) gxsum += gx[b * count + c];
        // Chunks without NaN/inf add finite amounts, which leave a non-finite sum as it is.
        for (int64_t c = 0; c < count; ++c)
          if (exact[b * count + c]) any_exact = true, gpsum += gp[b * count + c];
        drho.data_ptr<scalar_t>()[b * L + l - 1] = scalar_t((any_exact ? gpsum : twsum) - st.Lt[b] * gxsum);
      }
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
  check_rho_values(rho_in);
  check_model_Lt_values(model_Lt);
  // The GEMMs below write into preallocated buffers: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor out, states;
  std::tie(out, states) = empty_stack_outputs(d, return_all, checkpoint, x0_in.options());
  if (d.N == 0 || d.B == 0) return {out, states};
  advise_huge_pages(out);
  advise_huge_pages(states);
  // One model runs as B = 1: a leading model dimension on every array.
  const auto lead = [&](const at::Tensor& t) { return d.models ? t : t.unsqueeze(0); };
  const at::Tensor x0 = lead(x0_in).contiguous(), W = lead(W_in).contiguous(), rho = lead(rho_in).contiguous();
  at::Tensor out_b = lead(out), states_b = lead(states);
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "leaky_stack_cpu", [&] {
    visit_activation(d.act, [&](auto kAct) {
      stack_forward<decltype(kAct)::value, scalar_t>(d, x0, W, rho, Lt, model_Lt, return_all, checkpoint,
                                                    out_b, states_b);
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
  check_rho_values(rho_in);
  check_model_Lt_values(model_Lt);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor dx0, dW, drho;
  std::tie(dx0, dW, drho) = empty_stack_grads(d, grad_in.options());
  if (d.N == 0 || d.B == 0) return {dx0.zero_(), dW.zero_(), drho.zero_()};
  advise_huge_pages(dW);
  const auto lead = [&](const at::Tensor& t) { return d.models ? t : t.unsqueeze(0); };
  const at::Tensor grad = lead(grad_in).contiguous(), W = lead(W_in).contiguous(), rho = lead(rho_in).contiguous();
  const at::Tensor states = lead(states_in).narrow(1, 0, num_states(d.L, checkpoint)).contiguous();
  at::Tensor dx0_b = lead(dx0), dW_b = lead(dW), drho_b = lead(drho);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "leaky_stack_backward_cpu", [&] {
    visit_activation(d.act, [&](auto kAct) {
      stack_backward<decltype(kAct)::value, scalar_t>(d, grad, states, W, rho, Lt, model_Lt, checkpoint, dx0_b,
                                                     dW_b, drho_b);
    });
  });
  return {dx0, dW, drho};
}

}  // namespace leakycuda
