// Torch-free building blocks of the persistent leaky-stack sweeps for widths w <= 256: the activation,
// the compute kinds and cores (how a tile multiplies), weight packing, and the pipeline both sweeps run.
// The sweeps themselves are in leaky_stack_fwd.cuh and leaky_stack_bwd.cuh, the parameter gradients
// (dW, drho) in leaky_stack_dw.cuh.
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

}  // namespace kernels
}  // namespace leakycuda
