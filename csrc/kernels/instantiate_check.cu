// Torch-free translation unit: explicitly instantiates every kernel the CUDA launchers use, so CI can
// compile all device code with nvcc alone (sm_80 and sm_90).
#include "leaky_stack_instances.cuh"

namespace leakycuda {
namespace kernels {

#define LEAKY_MMA_FWD(KIND, BUCKET, MT)                                         \
  template __global__ void leaky_stack_fwd_kernel<MmaCore<KIND, BUCKET, MT>>( \
      const StackFwdParams<MmaCore<KIND, BUCKET, MT>::T, MmaCore<KIND, BUCKET, MT>::B>);
LEAKY_STACK_MMA_FWD_INSTANCES(LEAKY_MMA_FWD)

#define LEAKY_MMA_BWD(KIND, BUCKET, MT)                                         \
  template __global__ void leaky_stack_bwd_kernel<MmaCore<KIND, BUCKET, MT>>( \
      const StackBwdParams<MmaCore<KIND, BUCKET, MT>::T, MmaCore<KIND, BUCKET, MT>::B>);
LEAKY_STACK_MMA_BWD_INSTANCES(LEAKY_MMA_BWD)

#define LEAKY_FMA(T, BUCKET)                                                                          \
  template __global__ void leaky_stack_fwd_kernel<FmaCore<T, BUCKET>>(const StackFwdParams<T, T>); \
  template __global__ void leaky_stack_bwd_kernel<FmaCore<T, BUCKET>>(const StackBwdParams<T, T>);
LEAKY_STACK_FMA_INSTANCES(LEAKY_FMA)

#define LEAKY_TYPE(T)                                                                       \
  template __global__ void leaky_stack_pack_kernel<T, T>(const PackParams<T, T>);         \
  template __global__ void leaky_stack_drho_kernel<T>(const DrhoParams<T>);               \
  template __global__ void leaky_stack_fwd_ew_kernel<T>(const FwdEwParams<T>);            \
  template __global__ void leaky_stack_bwd_ew_kernel<T>(const BwdEwParams<T>);
LEAKY_STACK_TYPES(LEAKY_TYPE)

#define LEAKY_DW(T, MMA) template __global__ void leaky_stack_dw_kernel<T, MMA>(const DwParams<T>);
LEAKY_STACK_DW_INSTANCES(LEAKY_DW)

}  // namespace kernels
}  // namespace leakycuda
