// Torch-free parameter gradients of the leaky stack: dW per (model, layer) tile and drho from fixed-order
// partial sums (with the <G, P> fallback where <T, W> is not finite). Shared by the small-width path and,
// for drho's fallback and the reductions, by the large-width path (leaky_stack_large.cuh).
#pragma once

#include <cstdint>

#include "leaky_stack_cores.cuh"

namespace leakycuda {
namespace kernels {

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
