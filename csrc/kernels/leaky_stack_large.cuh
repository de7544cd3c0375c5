// Torch-free fused elementwise kernels of the large-width (w > 256) leaky stack, which runs its GEMMs
// through the vendor library: one launch per layer in the forward and one in the backward.
#pragma once

#include <cstdint>

#include "leaky_stack.cuh"

namespace leakycuda {
namespace kernels {

inline constexpr int kEwThreads = 256;

// Forward of layer i after the GEMM y = [relu(X_i), 1] W_i^T (bias included through the ones column),
// which was written into xout: xout = (1 - rho_i Lt) X_i + rho_i y, and r[:, :w] = relu(xout), the
// next GEMM's input.
template <typename T>
struct FwdEwParams {
  int64_t N;
  int w;
  double Lt;
  const T* __restrict__ x;  // X_i
  int64_t ldx;
  T* xout;  // in: y, out: X_{i+1} (same element read then written by one thread)
  int64_t ldo;
  T* __restrict__ r;  // [N, w+1] GEMM input; column w stays 1
  int64_t ldr;
  const T* __restrict__ rho;  // &rho[i]
};

template <typename T>
__global__ void __launch_bounds__(kEwThreads) leaky_stack_fwd_ew_kernel(const FwdEwParams<T> p) {
  using A = acc_t<T>;
  const A rho = to_acc<A>(*p.rho), leak = A(1) - rho * A(p.Lt);
  const int64_t total = p.N * p.w;
  for (int64_t idx = blockIdx.x * int64_t(kEwThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kEwThreads) {
    const int64_t row = idx / p.w;
    const int c = int(idx - row * p.w);
    const A xn = leak * to_acc<A>(p.x[row * p.ldx + c]) + rho * to_acc<A>(p.xout[row * p.ldo + c]);
    const T v = from_acc<T>(xn);
    p.xout[row * p.ldo + c] = v;
    p.r[row * p.ldr + c] = from_acc<T>(relu(to_acc<A>(v)));
  }
}

// Backward of layer i after the GEMM h = G_{i+1} V_i:
// gout = (1 - rho_i Lt) G_{i+1} + rho_i h * 1[X_i > 0] (+ gadd = dC/dX_i when given),
// r[:, :w] = relu(X_i) (the input of the dW GEMM G_{i+1}^T [relu(X_i), 1]), and this block's share of
// <G_{i+1}, X_i> in gx[blockIdx.x] (summed in a fixed order: grid and block sizes fix the order).
template <typename T>
struct BwdEwParams {
  int64_t N;
  int w;
  double Lt;
  const T* __restrict__ g;  // G_{i+1}
  int64_t ldg;
  const T* __restrict__ h;
  int64_t ldh;
  const T* __restrict__ x;  // X_i
  int64_t ldx;
  const T* __restrict__ gadd;  // optional
  int64_t ldga;
  T* __restrict__ gout;
  int64_t ldgo;
  T* __restrict__ r;
  int64_t ldr;
  const T* __restrict__ rho;  // &rho[i]
  acc_t<T>* __restrict__ gx;  // [gridDim.x]
};

template <typename T>
__global__ void __launch_bounds__(kEwThreads) leaky_stack_bwd_ew_kernel(const BwdEwParams<T> p) {
  using A = acc_t<T>;
  static_assert(kEwThreads == kRedThreads, "block_sum_fixed assumes kRedThreads threads");
  __shared__ A red[kEwThreads];
  const A rho = to_acc<A>(*p.rho), leak = A(1) - rho * A(p.Lt);
  const int64_t total = p.N * p.w;
  A gx = A(0);
  for (int64_t idx = blockIdx.x * int64_t(kEwThreads) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kEwThreads) {
    const int64_t row = idx / p.w;
    const int c = int(idx - row * p.w);
    const A g = to_acc<A>(p.g[row * p.ldg + c]), x = to_acc<A>(p.x[row * p.ldx + c]);
    A gn = leak * g + (x > A(0) ? rho * to_acc<A>(p.h[row * p.ldh + c]) : A(0));
    if (p.gadd) gn += to_acc<A>(p.gadd[row * p.ldga + c]);
    p.gout[row * p.ldgo + c] = from_acc<T>(gn);
    p.r[row * p.ldr + c] = from_acc<T>(relu(x));
    gx += g * x;
  }
  gx = block_sum_fixed(gx, red);
  if (threadIdx.x == 0) p.gx[blockIdx.x] = gx;
}

}  // namespace kernels
}  // namespace leakycuda
