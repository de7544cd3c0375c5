// Torch-free translation unit: explicitly instantiates every fused energies kernel the CUDA launcher
// (csrc/cuda/energies.cu) uses, so CI compiles their device code with nvcc alone (sm_80 and sm_90).
#include "energies.cuh"

namespace leakycuda {
namespace kernels {

#define LEAKY_ENERGIES_TYPE_ACT(T, RELU)                                                  \
  template __global__ void energies_gram_kernel<T, RELU>(const GramParams<T>);          \
  template __global__ void energies_bwd_kernel<T, RELU, 4>(const BwdParams<T>);         \
  template __global__ void energies_bwd_kernel<T, RELU, 2>(const BwdParams<T>);         \
  template __global__ void energies_bwd_kernel<T, RELU, 1>(const BwdParams<T>);
LEAKY_ENERGIES_TYPE_ACT(float, true)
LEAKY_ENERGIES_TYPE_ACT(float, false)
LEAKY_ENERGIES_TYPE_ACT(double, true)
LEAKY_ENERGIES_TYPE_ACT(double, false)
template __global__ void energies_solve_kernel<true>(const SolveParams);
template __global__ void energies_solve_kernel<false>(const SolveParams);

}  // namespace kernels
}  // namespace leakycuda
