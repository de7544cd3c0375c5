// Torch-free persistent backward sweep of the leaky stack for widths w <= 256: G_i from G_{i+1}, layer
// after layer, plus what the dW and drho kernels (leaky_stack_dw.cuh) read.
#pragma once

#include <cstdint>

#include "leaky_stack_cores.cuh"

namespace leakycuda {
namespace kernels {

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

}  // namespace kernels
}  // namespace leakycuda
