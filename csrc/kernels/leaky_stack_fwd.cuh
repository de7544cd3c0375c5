// Torch-free persistent forward sweep of the leaky stack for widths w <= 256 (one launch runs every
// layer of every model; the pipeline and cores are in leaky_stack_cores.cuh).
#pragma once

#include <cstdint>

#include "leaky_stack_cores.cuh"

namespace leakycuda {
namespace kernels {

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

}  // namespace kernels
}  // namespace leakycuda
