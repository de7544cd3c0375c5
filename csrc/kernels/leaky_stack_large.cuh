// Torch-free fused elementwise kernels of the large-width (w > 256) leaky stack, which runs its GEMMs
// through the vendor library (batched over models): one launch per layer in the forward and one in the
// backward, for every model at once.
#pragma once

#include <cstdint>

#include "leaky_stack_dw.cuh"

namespace leakycuda {
namespace kernels {

inline constexpr int kEwThreads = 256;

// Forward of layer i after the GEMM y = [act(X_i), 1] W_i^T (bias included through the ones column),
// which was written into xout: xout = (1 - rho_i Lt) X_i + rho_i y, and r[:, :w] = act(xout), the
// next GEMM's input. Model m owns CTAs [m * blocks, (m+1) * blocks) (grid = B * blocks) and reads
// x + m*x_bs, xout + m*o_bs, r + m*r_bs, rho + m*rho_bs.
template <typename T>
struct FwdEwParams {
  int64_t N;
  int w, blocks;
  double Lt;
  const double* __restrict__ model_Lt;  // [B] per-model Lt, or nullptr
  const T* __restrict__ x;  // X_i
  int64_t ldx, x_bs;
  T* xout;  // in: y, out: X_{i+1} (same element read then written by one thread)
  int64_t ldo, o_bs;
  T* __restrict__ r;  // [N, w+1] GEMM input; column w stays 1
  int64_t ldr, r_bs;
  const T* __restrict__ rho;  // &rho[model 0][i]
  int64_t rho_bs;
};

template <typename T, Act kAct>
__global__ void __launch_bounds__(kEwThreads) leaky_stack_fwd_ew_kernel(const FwdEwParams<T> p) {
  using A = acc_t<T>;
  const int m = blockIdx.x / p.blocks, blk = blockIdx.x - m * p.blocks;
  const T* x = p.x + m * p.x_bs;
  T* xout = p.xout + m * p.o_bs;
  T* r = p.r + m * p.r_bs;
  const A rho = to_acc<A>(p.rho[m * p.rho_bs]), leak = A(1) - rho * A(lt_of(p.model_Lt, p.Lt, m));
  const int64_t total = p.N * p.w;
  for (int64_t idx = blk * int64_t(kEwThreads) + threadIdx.x; idx < total; idx += int64_t(p.blocks) * kEwThreads) {
    const int64_t row = idx / p.w;
    const int c = int(idx - row * p.w);
    const A xn = leak * to_acc<A>(x[row * p.ldx + c]) + rho * to_acc<A>(xout[row * p.ldo + c]);
    const T v = from_acc<T>(xn);
    xout[row * p.ldo + c] = v;
    r[row * p.ldr + c] = from_acc<T>(activate<kAct>(to_acc<A>(v)));
  }
}

// Backward of layer i after the GEMM h = G_{i+1} V_i:
// gout = (1 - rho_i Lt) G_{i+1} + rho_i h * act'(X_i) (+ gadd = dC/dX_i when given),
// r[:, :w] = act(X_i) (the input of the dW GEMM G_{i+1}^T [act(X_i), 1]), and this block's share of
// <G_{i+1}, X_i> in gx[m * gx_bs + blk] (summed in a fixed order: grid and block sizes fix the order).
// Model m owns CTAs [m * blocks, (m+1) * blocks); every pointer advances by its `*_bs` per model.
template <typename T>
struct BwdEwParams {
  int64_t N;
  int w, blocks;
  double Lt;
  const double* __restrict__ model_Lt;
  const T* __restrict__ g;  // G_{i+1}
  int64_t ldg, g_bs;
  const T* __restrict__ h;
  int64_t ldh, h_bs;
  const T* __restrict__ x;  // X_i
  int64_t ldx, x_bs;
  const T* __restrict__ gadd;  // optional
  int64_t ldga, ga_bs;
  T* __restrict__ gout;
  int64_t ldgo, go_bs;
  T* __restrict__ r;
  int64_t ldr, r_bs;
  const T* __restrict__ rho;  // &rho[model 0][i]
  int64_t rho_bs;
  acc_t<T>* __restrict__ gx;  // &gx[model 0][i][0]; [blocks] per model
  int64_t gx_bs;
};

template <typename T, Act kAct>
__global__ void __launch_bounds__(kEwThreads) leaky_stack_bwd_ew_kernel(const BwdEwParams<T> p) {
  using A = acc_t<T>;
  static_assert(kEwThreads == kRedThreads, "block_sum_fixed assumes kRedThreads threads");
  __shared__ A red[kEwThreads];
  const int m = blockIdx.x / p.blocks, blk = blockIdx.x - m * p.blocks;
  const T* gp = p.g + m * p.g_bs;
  const T* hp = p.h + m * p.h_bs;
  const T* xp = p.x + m * p.x_bs;
  const T* gadd = p.gadd != nullptr ? p.gadd + m * p.ga_bs : nullptr;
  T* gout = p.gout + m * p.go_bs;
  T* r = p.r + m * p.r_bs;
  const A rho = to_acc<A>(p.rho[m * p.rho_bs]), leak = A(1) - rho * A(lt_of(p.model_Lt, p.Lt, m));
  const int64_t total = p.N * p.w;
  A gx = A(0);
  for (int64_t idx = blk * int64_t(kEwThreads) + threadIdx.x; idx < total; idx += int64_t(p.blocks) * kEwThreads) {
    const int64_t row = idx / p.w;
    const int c = int(idx - row * p.w);
    const A g = to_acc<A>(gp[row * p.ldg + c]), x = to_acc<A>(xp[row * p.ldx + c]);
    A gn = leak * g + (act_passes<kAct>(x) ? rho * to_acc<A>(hp[row * p.ldh + c]) : A(0));
    if (gadd) gn += to_acc<A>(gadd[row * p.ldga + c]);
    gout[row * p.ldgo + c] = from_acc<T>(gn);
    r[row * p.ldr + c] = from_acc<T>(activate<kAct>(x));
    gx += g * x;
  }
  gx = block_sum_fixed(gx, red);
  if (threadIdx.x == 0) p.gx[m * p.gx_bs + blk] = gx;
}

}  // namespace kernels
}  // namespace leakycuda
