// Torch-free device code of the persistent leaky-stack forward/backward sweeps for widths w <= 256.
//
// Shapes (batch-first, docs/DESIGN.md §1): X_l [N, w], W [L, w, w+1] (W_l = [V_l | b_l]), rho [L]; B models
// stack these with a leading [B] (one model is B = 1). sigma(X) = [act(X), 1], act = relu or identity.
// Forward layer i (0-based weight index): X_{i+1} = (1 - rho_i Lt) X_i + rho_i (act(X_i) V_i^T + b_i).
// Backward layer i:  G_i = (1 - rho_i Lt) G_{i+1} + rho_i (G_{i+1} V_i) * act'(X_i).
//
// Both sweeps are one persistent launch: CTA b of model m keeps rows [b*kRows, (b+1)*kRows) of that
// model's X (or G) in shared memory (in the accumulation type) through every layer of the launch, and
// streams the model's weights layer after layer through a ring of cp.async stages, so the next layer's
// weights are in flight while the current one multiplies. The model index is in the grid: blockIdx.x =
// m * tiles + b (tiles = row tiles per model), so B models at small N still fill the GPU. The weights
// come pre-packed (leaky_stack_pack_kernel) as zero-padded [Wp, Wp] blocks, Wp = w rounded up to 16, so
// any w <= 256 runs on the same aligned code; padded rows and columns of the resident tile are held at
// exactly 0, so a NaN or inf in a real entry never reaches a real output through a padded one.
#pragma once

#include <cstdint>

#include "mma.cuh"

namespace leakycuda {
namespace kernels {

inline constexpr int kMaxSmallWidth = 256;

// Padded width the small-width kernels compute with: w rounded up to a multiple of 16.
__host__ __device__ constexpr int padded_width(int w) { return (w + 15) / 16 * 16; }

// Elements of one layer in the packed weight buffer: a [Wp, Wp] block then the bias [Wp].
__host__ __device__ constexpr int64_t packed_layer_elems(int Wp) { return int64_t(Wp) * Wp + Wp; }

// Activation of sigma(X) = [act(X), 1]; the launchers map leakycuda::Activation onto it.
enum class Act : int { kRelu, kLinear };

// act(v): relu as torch.relu (v < 0 is false for NaN, so NaN stays NaN), or the identity.
template <Act kAct, typename A> __device__ __forceinline__ A activate(A v) {
  if constexpr (kAct == Act::kRelu) return v < A(0) ? A(0) : v;
  else return v;
}

// Whether a gradient passes act back to X at X = x: torch's relu backward (threshold_backward on the
// output relu(x)) passes it where !(relu(x) <= 0), i.e. at x > 0 and at NaN; the identity everywhere.
template <Act kAct, typename A> __device__ __forceinline__ bool act_passes(A x) {
  if constexpr (kAct == Act::kRelu) return !(x <= A(0));
  else return true;
}

// Lt of model m: the per-model value when model_Lt is given, else the shared scalar.
__device__ __forceinline__ double lt_of(const double* model_Lt, double Lt, int m) {
  return model_Lt != nullptr ? model_Lt[m] : Lt;
}

// ---------------------------------------------------------------------------------------------------
// Compute kinds: how the tile multiplies. Each says its storage type T (of x0, W, out), the packed
// weight type B, the k-step of one instruction, the weight chunk length kKC along k, and the row
// paddings (in elements) that keep shared-memory fragment reads free of bank conflicts.

// TF32 tensor cores on float32 data; the packed weights are pre-rounded to TF32.
struct KindTF32 {
  using T = float;
  using B = float;
  static constexpr int kKStep = 8, kKC = 32, kXPad = 4, kBPad = 4;
  // Row stride (Wp + 4) = 4 * odd words: the 8 rows x 4 columns of an A fragment hit 32 banks.
  template <Act kAct>
  __device__ static void load_a(uint32_t (&a)[4], const float* x, int xs, int t) {
    const float v0 = activate<kAct>(x[t]), v1 = activate<kAct>(x[8 * xs + t]);
    const float v2 = activate<kAct>(x[t + 4]), v3 = activate<kAct>(x[8 * xs + t + 4]);
    a[0] = to_tf32(v0), a[1] = to_tf32(v1), a[2] = to_tf32(v2), a[3] = to_tf32(v3);
  }
  __device__ static void load_b(uint32_t& b0, uint32_t& b1, const float* b, int t) {
    b0 = __float_as_uint(b[t]);
    b1 = __float_as_uint(b[t + 4]);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_tf32(d, a, b0, b1);
  }
};

// BF16 or FP16 tensor cores; the resident tile stays fp32 and is rounded only into the A fragments.
template <typename H>
struct KindHalf {
  using T = H;
  using B = H;
  static constexpr int kKStep = 16, kKC = 64, kXPad = 8, kBPad = 8;
  // Row stride (Wp + 8) = 8 * odd words: the 64-bit reads of each half-warp hit distinct bank pairs.
  template <Act kAct>
  __device__ static void load_a(uint32_t (&a)[4], const float* x, int xs, int t) {
    float2 v0 = *reinterpret_cast<const float2*>(x + 2 * t);
    float2 v1 = *reinterpret_cast<const float2*>(x + 8 * xs + 2 * t);
    float2 v2 = *reinterpret_cast<const float2*>(x + 2 * t + 8);
    float2 v3 = *reinterpret_cast<const float2*>(x + 8 * xs + 2 * t + 8);
    a[0] = pack2<H>(activate<kAct>(v0.x), activate<kAct>(v0.y));
    a[1] = pack2<H>(activate<kAct>(v1.x), activate<kAct>(v1.y));
    a[2] = pack2<H>(activate<kAct>(v2.x), activate<kAct>(v2.y));
    a[3] = pack2<H>(activate<kAct>(v3.x), activate<kAct>(v3.y));
  }
  __device__ static void load_b(uint32_t& b0, uint32_t& b1, const H* b, int t) {
    b0 = *reinterpret_cast<const uint32_t*>(b + 2 * t);
    b1 = *reinterpret_cast<const uint32_t*>(b + 2 * t + 8);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16bit<H>(d, a, b0, b1);
  }
};

// ---------------------------------------------------------------------------------------------------
// Tensor-core core: a CTA of kBucket/32 warps owns kMT m16 row tiles; warp v computes output columns
// [32v, 32v+32) as four n8 tiles (tiles at or past Wp are skipped).
// Shared weight chunk, "n-major": Bs[n][k] for n < Wp, k < kKC, row stride kKC + kBPad, which is the
// column-major B operand (B[k][n] = Bs[n][k]) mma.sync reads.
template <class Kind, int kBucket, int kMT>
struct MmaCore {
  using T = typename Kind::T;
  using B = typename Kind::B;
  using A = float;
  static constexpr int kWarps = kBucket / 32, kThreads = kWarps * 32, kRows = 16 * kMT, kNT = 4;
  static constexpr int kAcc = kMT * kNT * 4, kBias = kNT * 2;
  static constexpr int kKC = Kind::kKC, kXPad = Kind::kXPad;
  static constexpr bool kNMajor = true;

  __host__ __device__ static constexpr int b_stride(int) { return kKC + Kind::kBPad; }
  __host__ __device__ static constexpr int chunk_elems(int Wp) { return Wp * (kKC + Kind::kBPad); }

  // Copies k-columns [kc0, kc0 + klen) of every row of the packed layer P ([Wp][Wp]) into Bs.
  __device__ static void load_chunk(B* Bs, const B* P, int Wp, int kc0, int klen) {
    constexpr int E = 16 / sizeof(B);
    const int vpr = klen / E, total = Wp * vpr, bs = b_stride(Wp);
    for (int v = threadIdx.x; v < total; v += kThreads) {
      const int n = v / vpr, k = (v - n * vpr) * E;
      cp_async_16(Bs + n * bs + k, P + int64_t(n) * Wp + kc0 + k);
    }
  }

  // acc += act(X tile) chunk-of-weights; act = Act::kLinear multiplies the tile as is (the backward).
  template <Act kAct>
  __device__ static void compute(A (&acc)[kAcc], const A* Xs, int xs, const B* Bs, int kx0, int klen, int Wp) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, n0 = (threadIdx.x >> 5) * 32;
    const int bs = b_stride(Wp);
    for (int ks = 0; ks < klen; ks += Kind::kKStep) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        Kind::template load_a<kAct>(a[mt], Xs + (mt * 16 + g) * xs + kx0 + ks, xs, t);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (n0 + nt * 8 < Wp) {
          uint32_t b0, b1;
          Kind::load_b(b0, b1, Bs + (n0 + nt * 8 + g) * bs + ks, t);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt)
            Kind::mma(*reinterpret_cast<float(*)[4]>(&acc[(mt * kNT + nt) * 4]), a[mt], b0, b1);
        }
      }
    }
  }

  // Tile row r and column c of accumulator i; false where the n8 tile lies past Wp.
  __device__ static bool coord(int i, int Wp, int& r, int& c) {
    const int lane = threadIdx.x & 31, n0 = (threadIdx.x >> 5) * 32;
    const int mt = i / (kNT * 4), nt = (i / 4) % kNT, e = i % 4;
    r = mt * 16 + (lane >> 2) + ((e >> 1) << 3);
    c = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
    return n0 + nt * 8 < Wp;
  }
  __device__ static int bias_index(int i) { return ((i / 4) % kNT) * 2 + (i & 1); }
  __device__ static void load_bias(A (&bias)[kBias], const B* Pb, int Wp) {
    const int n0 = (threadIdx.x >> 5) * 32 + 2 * (threadIdx.x & 3);
#pragma unroll
    for (int j = 0; j < kBias; ++j) {
      const int c = n0 + (j / 2) * 8 + (j & 1);
      bias[j] = c < Wp ? to_acc<A>(Pb[c]) : A(0);
    }
  }
};

// Exact core (fp32 FFMA or fp64 DFMA): thread c of the CTA computes output column c for all 16 rows,
// summing k in order. Shared weight chunk, "k-major": Bs[k][n] for k < kKC, n < Wp, row stride Wp.
template <typename TT, int kBucket>
struct FmaCore {
  using T = TT;
  using B = TT;
  using A = TT;
  static constexpr int kWarps = kBucket / 32, kThreads = kWarps * 32, kRows = 16;
  static constexpr int kAcc = 16, kBias = 1;
  static constexpr int kKC = 128 / sizeof(TT), kXPad = 16 / sizeof(TT);
  static constexpr bool kNMajor = false;

  __host__ __device__ static constexpr int b_stride(int Wp) { return Wp; }
  __host__ __device__ static constexpr int chunk_elems(int Wp) { return kKC * Wp; }

  // Copies packed rows [kc0, kc0 + klen) of P ([Wp][Wp], row = k) into Bs.
  __device__ static void load_chunk(B* Bs, const B* P, int Wp, int kc0, int klen) {
    constexpr int E = 16 / sizeof(B);
    const int vpr = Wp / E, total = klen * vpr;
    for (int v = threadIdx.x; v < total; v += kThreads) {
      const int k = v / vpr, c = (v - k * vpr) * E;
      cp_async_16(Bs + k * Wp + c, P + int64_t(kc0 + k) * Wp + c);
    }
  }

  template <Act kAct>
  __device__ static void compute(A (&acc)[kAcc], const A* Xs, int xs, const B* Bs, int kx0, int klen, int Wp) {
    constexpr int E = 16 / sizeof(TT);
    const int c = threadIdx.x;
    if (c >= Wp) return;
    for (int k = 0; k < klen; k += E) {
      A b[E];
#pragma unroll
      for (int e = 0; e < E; ++e) b[e] = Bs[(k + e) * Wp + c];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        alignas(16) A xa[E];
        *reinterpret_cast<uint4*>(xa) = *reinterpret_cast<const uint4*>(Xs + r * xs + kx0 + k);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r] = fma(activate<kAct>(xa[e]), b[e], acc[r]);
      }
    }
  }

  __device__ static bool coord(int i, int Wp, int& r, int& c) {
    r = i;
    c = threadIdx.x;
    return c < Wp;
  }
  __device__ static int bias_index(int) { return 0; }
  __device__ static void load_bias(A (&bias)[kBias], const B* Pb, int Wp) {
    bias[0] = int(threadIdx.x) < Wp ? Pb[threadIdx.x] : A(0);
  }
};

// Bytes of dynamic shared memory a sweep of Core needs at padded width Wp with `stages` weight stages.
template <class Core>
__host__ __device__ constexpr int64_t sweep_smem_bytes(int Wp, int stages) {
  return 2 * int64_t(Core::kRows) * (Wp + Core::kXPad) * sizeof(typename Core::A) +
         int64_t(stages) * Core::chunk_elems(Wp) * sizeof(typename Core::B);
}

// ---------------------------------------------------------------------------------------------------
// Packing: P[l] = zero-padded [Wp][Wp] block of V_l (transposed or not) in the core's weight type,
// then the bias b_l padded to Wp. Forward on tensor cores reads V_l as is (n-major: P[n][k] = V[n][k]);
// the exact forward wants k-major (P[k][n] = V[n][k], transpose); backward multiplies by V_l instead
// of V_l^T, so it flips the choice.
template <typename T, typename B>
struct PackParams {
  int L, w, Wp;
  bool transpose, round_tf32;
  const T* __restrict__ W;  // [L, w, w+1] contiguous; L counts every layer of every model
  B* __restrict__ P;        // [L, Wp*Wp + Wp]
};

template <typename T, typename B>
__global__ void leaky_stack_pack_kernel(const PackParams<T, B> p) {
  using A = acc_t<T>;
  const int64_t per = packed_layer_elems(p.Wp), total = per * p.L;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = idx / per;
    const int j = int(idx - l * per);
    const T* Wl = p.W + l * p.w * int64_t(p.w + 1);
    A v = A(0);
    if (j < p.Wp * p.Wp) {
      const int row = j / p.Wp, col = j - row * p.Wp;
      const int n = p.transpose ? col : row, k = p.transpose ? row : col;
      if (n < p.w && k < p.w) v = to_acc<A>(Wl[n * (p.w + 1) + k]);
      if (p.round_tf32) v = __uint_as_float(to_tf32(float(v)));
    } else {
      const int c = j - p.Wp * p.Wp;
      if (c < p.w) v = to_acc<A>(Wl[c * (p.w + 1) + p.w]);
    }
    p.P[idx] = from_acc<B>(v);
  }
}

// ---------------------------------------------------------------------------------------------------
// Shared pipeline of both sweeps.
// Dynamic shared memory:
//   X[2][kRows][Wp + kXPad]  (A)  ping-pong resident tile: X_i in the forward, G_{i+1} in the backward;
//                                  layer j reads buffer j%2 and writes j%2^1, so one barrier per chunk.
//   Bs[stages][chunk_elems]  (B)  ring of weight chunks; chunk q = (layer q / nchunk, k-chunk q % nchunk);
//                                  chunk q + stages - 1 is issued right after the barrier of chunk q.
// `begin(j)` runs before the first chunk of the j-th layer of the launch, `end(j, acc, Xcur, Xnext)`
// after its last chunk; `layer_of(j)` maps j to the weight index; `packed` is this model's packed stack.
// kAct is applied to the tile as it enters the multiply (Act::kLinear: the tile as is).
template <class Core, Act kAct, class LayerOf, class Begin, class End>
__device__ __forceinline__ void sweep_pipeline(typename Core::A* Xbuf, typename Core::B* Bbuf, int Wp, int xs,
                                               int nlayers, int stages, const typename Core::B* packed,
                                               LayerOf layer_of, Begin begin, End end) {
  using A = typename Core::A;
  constexpr int kKC = Core::kKC;
  const int x_elems = Core::kRows * xs, chunk = Core::chunk_elems(Wp);
  const int nchunk = (Wp + kKC - 1) / kKC, total = nlayers * nchunk;
  const int64_t per = packed_layer_elems(Wp);

  auto issue = [&](int q) {
    if (q < total) {
      const int kc0 = (q % nchunk) * kKC;
      Core::load_chunk(Bbuf + (q % stages) * chunk, packed + layer_of(q / nchunk) * per, Wp, kc0,
                       min(kKC, Wp - kc0));
    }
    cp_async_commit();
  };
  for (int s = 0; s < stages - 1; ++s) issue(s);

  A acc[Core::kAcc];
  for (int q = 0; q < total; ++q) {
    const int j = q / nchunk, ch = q - j * nchunk;
    if (ch == 0) {
#pragma unroll
      for (int i = 0; i < Core::kAcc; ++i) acc[i] = A(0);
      begin(j);
    }
    cp_async_wait_dyn(stages - 2);
    __syncthreads();
    issue(q + stages - 1);
    const int kc0 = ch * kKC;
    Core::template compute<kAct>(acc, Xbuf + (j & 1) * x_elems, xs, Bbuf + (q % stages) * chunk, kc0,
                                 min(kKC, Wp - kc0), Wp);
    if (ch == nchunk - 1) end(j, acc, Xbuf + (j & 1) * x_elems, Xbuf + ((j & 1) ^ 1) * x_elems);
  }
  cp_async_wait<0>();
}

// Forward over layers [layer_begin, layer_end) from X_a = x (a = layer_begin), for every model.
// Writes X_{a+j} (j >= 1) to out_all + (j-1)*all_stride (if set), X_{i} with i % checkpoint == 0 and
// i < L to states + (i/checkpoint)*states_stride (if set), and X_b to out_last (if set). Every `*_bs`
// is the element stride between models (model m reads x + m*x_bs, rho + m*rho_bs, ...).
// grid = B * ceil(N / kRows) CTAs of Core::kThreads.
template <typename T, typename B>
struct StackFwdParams {
  int N, w, Wp, L, layer_begin, layer_end, checkpoint, stages;
  double Lt;
  const double* __restrict__ model_Lt;  // [B] per-model Lt, or nullptr: every model uses Lt
  const T* __restrict__ x;
  int64_t ldx, x_bs;
  const B* __restrict__ packed;  // leaky_stack_pack_kernel output for this core, [B * L] packed layers
  int64_t packed_bs;
  const T* __restrict__ rho;
  int64_t rho_bs;
  T* __restrict__ out_all;
  int64_t all_ld, all_stride, all_bs;
  T* __restrict__ states;
  int64_t states_ld, states_stride, states_bs;
  T* __restrict__ out_last;
  int64_t last_ld, last_bs;
};

template <class Core, Act kAct>
__global__ void __launch_bounds__(Core::kThreads)
    leaky_stack_fwd_kernel(const StackFwdParams<typename Core::T, typename Core::B> p) {
  using T = typename Core::T;
  using A = typename Core::A;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* Xbuf = reinterpret_cast<A*>(smem_raw);
  const int xs = p.Wp + Core::kXPad;
  auto* Bbuf = reinterpret_cast<typename Core::B*>(Xbuf + 2 * Core::kRows * xs);
  const int tiles = (p.N + Core::kRows - 1) / Core::kRows;
  const int m = blockIdx.x / tiles, row0 = (blockIdx.x - m * tiles) * Core::kRows;

  const T* x = p.x + m * p.x_bs;
  const typename Core::B* packed = p.packed + m * p.packed_bs;
  const T* rhos = p.rho + m * p.rho_bs;
  T* out_all = p.out_all != nullptr ? p.out_all + m * p.all_bs : nullptr;
  T* states = p.states != nullptr ? p.states + m * p.states_bs : nullptr;
  T* out_last = p.out_last != nullptr ? p.out_last + m * p.last_bs : nullptr;

  for (int idx = threadIdx.x; idx < Core::kRows * p.Wp; idx += Core::kThreads) {
    const int r = idx / p.Wp, c = idx - r * p.Wp, row = row0 + r;
    Xbuf[r * xs + c] = (row < p.N && c < p.w) ? to_acc<A>(x[row * p.ldx + c]) : A(0);
  }

  const int a = p.layer_begin, nlayers = p.layer_end - p.layer_begin;
  const A Lt = A(lt_of(p.model_Lt, p.Lt, m));
  A rho = A(0), bias[Core::kBias];
  auto layer_of = [&](int j) { return a + j; };
  auto begin = [&](int j) {
    rho = to_acc<A>(rhos[a + j]);
    Core::load_bias(bias, packed + (a + j) * packed_layer_elems(p.Wp) + int64_t(p.Wp) * p.Wp, p.Wp);
  };
  auto end = [&](int j, A(&acc)[Core::kAcc], const A* Xcur, A* Xnext) {
    const A leak = A(1) - rho * Lt;
    const int xi = a + j + 1;  // index of the representation this layer produces
    const bool to_state = states != nullptr && xi < p.L && xi % p.checkpoint == 0;
    const bool to_last = out_last != nullptr && j == nlayers - 1;
#pragma unroll
    for (int i = 0; i < Core::kAcc; ++i) {
      int r, c;
      if (!Core::coord(i, p.Wp, r, c)) continue;
      const int row = row0 + r;
      const bool on = row < p.N && c < p.w;
      const A xn = leak * Xcur[r * xs + c] + rho * (acc[i] + bias[Core::bias_index(i)]);
      Xnext[r * xs + c] = on ? xn : A(0);
      if (on) {
        const T v = from_acc<T>(xn);
        if (out_all) out_all[j * p.all_stride + row * p.all_ld + c] = v;
        if (to_state) states[(xi / p.checkpoint) * p.states_stride + row * p.states_ld + c] = v;
        if (to_last) out_last[row * p.last_ld + c] = v;
      }
    }
  };
  sweep_pipeline<Core, kAct>(Xbuf, Bbuf, p.Wp, xs, nlayers, p.stages, packed, layer_of, begin, end);
}

// Backward over layers [layer_begin, layer_end), from the top down, for every model. g holds G_b =
// dC/dX_b on entry and G_a on exit (in place; acc type). X_i is read from xs + (i-a)*xs_stride;
// grad_all (optional) adds dC/dX_i into G_i. G_{i+1} goes to gseg + (i-a)*gseg_stride for the dW
// kernel, and each warp's share of <G_{i+1}, X_i> to gx_partial[i * gx_stride + tile * kWarps + warp].
// `*_bs`: element strides between models; grid = B * ceil(N / kRows) CTAs.
template <typename T, typename B>
struct StackBwdParams {
  int N, w, Wp, layer_begin, layer_end, stages, gx_stride;
  double Lt;
  const double* __restrict__ model_Lt;
  acc_t<T>* __restrict__ g;
  int64_t ldg, g_bs;
  const T* __restrict__ xs;
  int64_t xs_ld, xs_stride, xs_bs;
  const T* __restrict__ grad_all;
  int64_t ga_ld, ga_stride, ga_bs;
  const B* __restrict__ packed;
  int64_t packed_bs;
  const T* __restrict__ rho;
  int64_t rho_bs;
  acc_t<T>* __restrict__ gseg;
  int64_t gseg_ld, gseg_stride, gseg_bs;
  acc_t<T>* __restrict__ gx_partial;
  int64_t gx_bs;
};

template <class Core, Act kAct>
__global__ void __launch_bounds__(Core::kThreads)
    leaky_stack_bwd_kernel(const StackBwdParams<typename Core::T, typename Core::B> p) {
  using T = typename Core::T;
  using A = typename Core::A;
  static_assert(sizeof(A) == sizeof(acc_t<T>), "resident tile is the accumulation type");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* Xbuf = reinterpret_cast<A*>(smem_raw);
  const int xs = p.Wp + Core::kXPad;
  auto* Bbuf = reinterpret_cast<typename Core::B*>(Xbuf + 2 * Core::kRows * xs);
  const int tiles = (p.N + Core::kRows - 1) / Core::kRows;
  const int m = blockIdx.x / tiles, tile = blockIdx.x - m * tiles, row0 = tile * Core::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  A* g = p.g + m * p.g_bs;
  const T* xsrc = p.xs + m * p.xs_bs;
  const T* grad_all = p.grad_all != nullptr ? p.grad_all + m * p.ga_bs : nullptr;
  const typename Core::B* packed = p.packed + m * p.packed_bs;
  const T* rhos = p.rho + m * p.rho_bs;
  A* gseg = p.gseg + m * p.gseg_bs;
  A* gx_partial = p.gx_partial + m * p.gx_bs;

  for (int idx = threadIdx.x; idx < Core::kRows * p.Wp; idx += Core::kThreads) {
    const int r = idx / p.Wp, c = idx - r * p.Wp, row = row0 + r;
    Xbuf[r * xs + c] = (row < p.N && c < p.w) ? A(g[row * p.ldg + c]) : A(0);
  }

  const int a = p.layer_begin, b = p.layer_end, nlayers = b - a;
  const A Lt = A(lt_of(p.model_Lt, p.Lt, m));
  A rho = A(0), xm[Core::kAcc], gadd[Core::kAcc];
  auto layer_of = [&](int j) { return b - 1 - j; };
  auto begin = [&](int j) {
    const int i = b - 1 - j;
    rho = to_acc<A>(rhos[i]);
#pragma unroll
    for (int e = 0; e < Core::kAcc; ++e) {
      int r, c;
      const bool on = Core::coord(e, p.Wp, r, c) && row0 + r < p.N && c < p.w;
      const int64_t row = row0 + r;
      xm[e] = on ? to_acc<A>(xsrc[(i - a) * p.xs_stride + row * p.xs_ld + c]) : A(0);
      gadd[e] = on && grad_all ? to_acc<A>(grad_all[i * p.ga_stride + row * p.ga_ld + c]) : A(0);
    }
  };
  auto end = [&](int j, A(&acc)[Core::kAcc], const A* Gcur, A* Gnext) {
    const int i = b - 1 - j;
    const A leak = A(1) - rho * Lt;
    A gx = A(0);
#pragma unroll
    for (int e = 0; e < Core::kAcc; ++e) {
      int r, c;
      if (!Core::coord(e, p.Wp, r, c)) continue;
      const int64_t row = row0 + r;
      const bool on = row < p.N && c < p.w;
      const A go = Gcur[r * xs + c];
      if (on) gx += go * xm[e];
      const A gn = leak * go + (act_passes<kAct>(xm[e]) ? rho * acc[e] : A(0)) + gadd[e];
      Gnext[r * xs + c] = on ? gn : A(0);
      if (on) {
        gseg[(i - a) * p.gseg_stride + row * p.gseg_ld + c] = go;
        if (i == a) g[row * p.ldg + c] = gn;
      }
    }
    gx = warp_sum(gx);
    if (lane == 0) gx_partial[int64_t(i) * p.gx_stride + tile * Core::kWarps + warp] = gx;
  };
  // The backward multiplies G_{i+1} itself by V_i: no activation on the tile.
  sweep_pipeline<Core, Act::kLinear>(Xbuf, Bbuf, p.Wp, xs, nlayers, p.stages, packed, layer_of, begin, end);
}

// ---------------------------------------------------------------------------------------------------
// dW of a segment: for each model m and layer i in [layer_begin, layer_end), T_i = G_{i+1}^T [act(X_i), 1]
// ([w, w+1], summed over all N rows in a fixed order by one CTA per 64x64 output tile), then
// dW_i = rho_i T_i and tw_partial[m][i][tile] = <T_i, W_i> over the tile (tw_partial is [B, L, tiles]).
// grid = (B * tiles, layer_end - layer_begin), tiles = ceil(w/64) * ceil((w+1)/64), kDwThreads threads.
inline constexpr int kDwTile = 64, kDwThreads = 128;

__host__ __device__ constexpr int dw_tiles(int w) {
  return ((w + kDwTile - 1) / kDwTile) * ((w + 1 + kDwTile - 1) / kDwTile);
}

template <typename T>
struct DwParams {
  int N, w, L, layer_begin, layer_end;
  const acc_t<T>* __restrict__ gseg;  // G_{i+1} at (i-a)*gseg_stride
  int64_t gseg_ld, gseg_stride, gseg_bs;
  const T* __restrict__ xs;  // X_i at (i-a)*xs_stride
  int64_t xs_ld, xs_stride, xs_bs;
  const T* __restrict__ W;    // [B, L, w, w+1] contiguous
  const T* __restrict__ rho;  // [B, L] contiguous
  T* __restrict__ dW;         // [B, L, w, w+1] contiguous
  acc_t<T>* __restrict__ tw_partial;
};

// kMma: TF32 tensor cores (float accumulation); else exact FMA in acc_t<T>.
// Shared memory: Gs[2][kRK][kDwTile + 8] = G rows (k = batch row, then output row n), Ss likewise for
// S = [act(X), 1] (then output column c); stride 72 = 8 (mod 32) words keeps the fragment reads of
// 8 n-values x 4 k-values on distinct banks. Two buffers: the next row chunk is loaded into registers
// while the current one multiplies, stored to the other buffer, one barrier per chunk.
template <typename T, bool kMma, Act kAct>
__global__ void __launch_bounds__(kDwThreads) leaky_stack_dw_kernel(const DwParams<T> p) {
  using A = acc_t<T>;
  static_assert(!kMma || sizeof(A) == 4, "the tensor-core dW path accumulates in fp32");
  constexpr int kRK = 128 / sizeof(A), kLd = kDwTile + 8, kPer = kRK * kDwTile / kDwThreads;
  __shared__ __align__(16) A Gs[2][kRK * kLd];
  __shared__ __align__(16) A Ss[2][kRK * kLd];
  __shared__ A red[kDwThreads / 32];

  const int tiles = dw_tiles(p.w), tiles_c = (p.w + 1 + kDwTile - 1) / kDwTile;
  const int m = blockIdx.x / tiles, tile = blockIdx.x - m * tiles;
  const int n_base = (tile / tiles_c) * kDwTile, c_base = (tile % tiles_c) * kDwTile;
  const int i = p.layer_begin + blockIdx.y;
  const A* G = p.gseg + m * p.gseg_bs + int64_t(blockIdx.y) * p.gseg_stride;
  const T* X = p.xs + m * p.xs_bs + int64_t(blockIdx.y) * p.xs_stride;
  const int tid = threadIdx.x, col = tid % kDwTile, rsub = tid / kDwTile;
  constexpr int kRowStep = kDwThreads / kDwTile;

  A gv[kPer], sv[kPer];
  auto load = [&](int r0) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t row = r0 + rsub + k * kRowStep;
      const int n = n_base + col, c = c_base + col;
      const bool rok = row < p.N;
      gv[k] = rok && n < p.w ? G[row * p.gseg_ld + n] : A(0);
      sv[k] = !rok ? A(0) : c < p.w ? activate<kAct>(to_acc<A>(X[row * p.xs_ld + c])) : c == p.w ? A(1) : A(0);
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      Gs[buf][(rsub + k * kRowStep) * kLd + col] = gv[k];
      Ss[buf][(rsub + k * kRowStep) * kLd + col] = sv[k];
    }
  };

  // Accumulators: MMA: warp (wm, wn) = (warp/2, warp%2) owns n rows [32wm, +32) as 2 m16 tiles and
  // c columns [32wn, +32) as 4 n8 tiles. FMA: thread (ty, tx) = (tid/16, tid%16) owns n = ty + 8a,
  // c = tx + 16b for a < 8, b < 4.
  A acc[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) acc[e] = A(0);
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = (warp >> 1) * 32, c0 = (warp & 1) * 32, ty = tid / 16, tx = tid % 16;

  const int nch = (p.N + kRK - 1) / kRK;
  load(0);
  store(0);
  __syncthreads();
  for (int ch = 0; ch < nch; ++ch) {
    if (ch + 1 < nch) load((ch + 1) * kRK);
    const A* gs = Gs[ch & 1];
    const A* ss = Ss[ch & 1];
    if constexpr (kMma) {
#pragma unroll
      for (int ks = 0; ks < kRK; ks += 8) {
        uint32_t af[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int mm = m0 + mt * 16 + g;
          af[mt][0] = to_tf32(gs[(ks + t) * kLd + mm]);
          af[mt][1] = to_tf32(gs[(ks + t) * kLd + mm + 8]);
          af[mt][2] = to_tf32(gs[(ks + t + 4) * kLd + mm]);
          af[mt][3] = to_tf32(gs[(ks + t + 4) * kLd + mm + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int n = c0 + nt * 8 + g;
          const uint32_t b0 = to_tf32(ss[(ks + t) * kLd + n]), b1 = to_tf32(ss[(ks + t + 4) * kLd + n]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
            mma_tf32(*reinterpret_cast<float(*)[4]>(&acc[(mt * 4 + nt) * 4]), af[mt], b0, b1);
        }
      }
    } else {
#pragma unroll 4
      for (int r = 0; r < kRK; ++r) {
        A av[8], bv[4];
#pragma unroll
        for (int q = 0; q < 8; ++q) av[q] = gs[r * kLd + ty + 8 * q];
#pragma unroll
        for (int q = 0; q < 4; ++q) bv[q] = ss[r * kLd + tx + 16 * q];
#pragma unroll
        for (int q = 0; q < 8; ++q)
#pragma unroll
          for (int s = 0; s < 4; ++s) acc[q * 4 + s] = fma(av[q], bv[s], acc[q * 4 + s]);
      }
    }
    if (ch + 1 < nch) store((ch + 1) & 1);
    __syncthreads();
  }

  const int64_t layer = int64_t(m) * p.L + i;  // index of (model m, layer i) in [B, L]
  const A rho = to_acc<A>(p.rho[layer]);
  const T* Wi = p.W + layer * p.w * (p.w + 1);
  T* dWi = p.dW + layer * p.w * (p.w + 1);
  A tw = A(0);
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    int n, c;
    if constexpr (kMma) {
      const int mt = e / 16, nt = (e / 4) % 4, q = e % 4;
      n = n_base + m0 + mt * 16 + g + ((q >> 1) << 3);
      c = c_base + c0 + nt * 8 + 2 * t + (q & 1);
    } else {
      n = n_base + ty + 8 * (e / 4);
      c = c_base + tx + 16 * (e % 4);
    }
    if (n < p.w && c <= p.w) {
      const int64_t off = int64_t(n) * (p.w + 1) + c;
      tw += acc[e] * to_acc<A>(Wi[off]);
      dWi[off] = from_acc<T>(rho * acc[e]);
    }
  }
  tw = warp_sum(tw);
  if (lane == 0) red[warp] = tw;
  __syncthreads();
  if (tid == 0) {
    A s = A(0);
#pragma unroll
    for (int v = 0; v < kDwThreads / 32; ++v) s += red[v];
    p.tw_partial[layer * tiles + tile] = s;
  }
}

// drho_i = <G_{i+1}, P_i> - Lt <G_{i+1}, X_i> with P_i = [act(X_i), 1] W_i^T (the reference's form).
// The kernels form the first term as <T_i, W_i> (T_i = G_{i+1}^T [act(X_i), 1]): equal for finite
// operands, but not in which non-finite value comes out (an inf in W_i against a zero column of act(X_i)
// is NaN in P_i and inf in T_i W_i). So where the partials of <T_i, W_i> do not sum to a finite number
// (exactly when T_i or W_i holds a NaN or inf, or the sum overflows), leaky_stack_tw_fallback_kernel
// forms <G_{i+1}, P_i> itself into gp partials, and drho takes those instead.
inline constexpr int kRedThreads = 256;

// Whether the partials of <T_i, W_i> sum to a finite number, summed in index order: the one test the
// fallback and drho kernels both make (the same arithmetic, so they always agree).
template <typename A>
__device__ __forceinline__ bool tw_finite(const A* tw, int count) {
  A s = A(0);
  for (int t = 0; t < count; ++t) s += tw[t];
  return isfinite(s);
}

template <typename A>
__device__ A block_sum_fixed(A v, A* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int s = kRedThreads / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const A r = red[0];
  __syncthreads();
  return r;
}

// <G_{i+1}, P_i> of the (model, layer) pairs of a segment whose <T_i, W_i> is not finite, in gp_count
// partials over row blocks of ceil(N / gp_count) rows (fixed order in each); other pairs return at once.
// grid = (B * (layer_end - layer_begin), gp_count) CTAs of kRedThreads; blockIdx.x = m * nlayers + j.
// TG: the type G is held in (the accumulation type in the small-width sweeps, T on the GEMM path).
template <typename T, typename TG>
struct TwFallbackParams {
  int N, w, L, layer_begin, layer_end, tw_count, gp_count;
  const TG* __restrict__ g;  // G_{i+1} of model m at m*g_bs + (i - layer_begin)*g_stride
  int64_t g_ld, g_stride, g_bs;
  const T* __restrict__ xs;  // X_i likewise
  int64_t xs_ld, xs_stride, xs_bs;
  const T* __restrict__ W;            // [B, L, w, w+1] contiguous
  const acc_t<T>* __restrict__ tw;    // [B, L, tw_count]
  acc_t<T>* __restrict__ gp;          // [B, L, gp_count]
};

template <typename T, typename TG, Act kAct>
__global__ void __launch_bounds__(kRedThreads) leaky_stack_tw_fallback_kernel(const TwFallbackParams<T, TG> p) {
  using A = acc_t<T>;
  __shared__ A red[kRedThreads];
  const int nl = p.layer_end - p.layer_begin;
  const int m = blockIdx.x / nl, j = blockIdx.x - m * nl;
  const int64_t layer = int64_t(m) * p.L + p.layer_begin + j;
  if (tw_finite(p.tw + layer * p.tw_count, p.tw_count)) return;  // the same answer in every thread
  const TG* G = p.g + m * p.g_bs + j * p.g_stride;
  const T* X = p.xs + m * p.xs_bs + j * p.xs_stride;
  const T* Wi = p.W + layer * p.w * (p.w + 1);
  const int64_t rows = (int64_t(p.N) + p.gp_count - 1) / p.gp_count, r0 = blockIdx.y * rows;
  const int64_t r1 = r0 + rows < p.N ? r0 + rows : p.N, total = r1 > r0 ? (r1 - r0) * p.w : 0;
  A gp = A(0);
  for (int64_t e = threadIdx.x; e < total; e += kRedThreads) {
    const int64_t r = r0 + e / p.w;
    const int n = int(e % p.w);
    const T* Wn = Wi + int64_t(n) * (p.w + 1);
    A pn = to_acc<A>(Wn[p.w]);
    for (int k = 0; k < p.w; ++k) pn += activate<kAct>(to_acc<A>(X[r * p.xs_ld + k])) * to_acc<A>(Wn[k]);
    gp += to_acc<A>(G[r * p.g_ld + n]) * pn;
  }
  gp = block_sum_fixed(gp, red);
  if (threadIdx.x == 0) p.gp[layer * p.gp_count + blockIdx.y] = gp;
}

// drho[m][i] = (sum_t tw[m][i][t], or sum_r gp[m][i][r] where that is not finite) - Lt_m * sum_c gx[m][i][c]:
// one CTA of kRedThreads per (model, layer) (blockIdx.x = m * L + i), fixed-order trees.
template <typename T>
struct DrhoParams {
  int L, tw_count, gx_count, gp_count;
  double Lt;
  const double* __restrict__ model_Lt;
  const acc_t<T>* __restrict__ tw;  // [B, L, tw_count]
  const acc_t<T>* __restrict__ gx;  // [B, L, gx_count]
  const acc_t<T>* __restrict__ gp;  // [B, L, gp_count], read only where tw is not finite
  T* __restrict__ drho;             // [B, L]
};

template <typename T>
__global__ void __launch_bounds__(kRedThreads) leaky_stack_drho_kernel(const DrhoParams<T> p) {
  using A = acc_t<T>;
  __shared__ A red[kRedThreads];
  const int64_t li = blockIdx.x;
  const int m = int(li / p.L);
  const bool finite = tw_finite(p.tw + li * p.tw_count, p.tw_count);
  const A* first = finite ? p.tw + li * p.tw_count : p.gp + li * p.gp_count;
  const int count = finite ? p.tw_count : p.gp_count;
  A tw = A(0), gx = A(0);
  for (int k = threadIdx.x; k < count; k += kRedThreads) tw += first[k];
  for (int k = threadIdx.x; k < p.gx_count; k += kRedThreads) gx += p.gx[li * p.gx_count + k];
  tw = block_sum_fixed(tw, red);
  gx = block_sum_fixed(gx, red);
  if (threadIdx.x == 0) p.drho[li] = from_acc<T>(tw - A(lt_of(p.model_Lt, p.Lt, m)) * gx);
}

}  // namespace kernels
}  // namespace leakycuda
