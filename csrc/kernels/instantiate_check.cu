// Torch-free translation unit: explicitly instantiates every kernel the CUDA launchers use, so CI can
// compile all device code with nvcc alone (sm_80 and sm_90).
#include "leaky_stack_instances.cuh"

namespace leakycuda {
namespace kernels {

#define LEAKY_MMA_FWD(ACT, KIND, BUCKET, MT)                                          \
  template __global__ void leaky_stack_fwd_kernel<MmaCore<KIND, BUCKET, MT>, ACT>( \
      const StackFwdParams<MmaCore<KIND, BUCKET, MT>::T, MmaCore<KIND, BUCKET, MT>::B>);
#define LEAKY_MMA_FWD_ALL(KIND, BUCKET, MT) LEAKY_STACK_ACTIVATIONS(LEAKY_MMA_FWD, KIND, BUCKET, MT)
LEAKY_STACK_MMA_FWD_INSTANCES(LEAKY_MMA_FWD_ALL)

#define LEAKY_MMA_BWD(ACT, KIND, BUCKET, MT)                                          \
  template __global__ void leaky_stack_bwd_kernel<MmaCore<KIND, BUCKET, MT>, ACT>( \
      const StackBwdParams<MmaCore<KIND, BUCKET, MT>::T, MmaCore<KIND, BUCKET, MT>::B>);
#define LEAKY_MMA_BWD_ALL(KIND, BUCKET, MT) LEAKY_STACK_ACTIVATIONS(LEAKY_MMA_BWD, KIND, BUCKET, MT)
LEAKY_STACK_MMA_BWD_INSTANCES(LEAKY_MMA_BWD_ALL)

#define LEAKY_FMA(ACT, T, BUCKET)                                                                          \
  template __global__ void leaky_stack_fwd_kernel<FmaCore<T, BUCKET>, ACT>(const StackFwdParams<T, T>); \
  template __global__ void leaky_stack_bwd_kernel<FmaCore<T, BUCKET>, ACT>(const StackBwdParams<T, T>);
#define LEAKY_FMA_ALL(T, BUCKET) LEAKY_STACK_ACTIVATIONS(LEAKY_FMA, T, BUCKET)
LEAKY_STACK_FMA_INSTANCES(LEAKY_FMA_ALL)

#define LEAKY_TYPE(T)                                                               \
  template __global__ void leaky_stack_pack_kernel<T, T>(const PackParams<T, T>); \
  template __global__ void leaky_stack_drho_kernel<T>(const DrhoParams<T>);
LEAKY_STACK_TYPES(LEAKY_TYPE)

#define LEAKY_EW(ACT, T)                                                                 \
  template __global__ void leaky_stack_fwd_ew_kernel<T, ACT>(const FwdEwParams<T>); \
  template __global__ void leaky_stack_bwd_ew_kernel<T, ACT>(const BwdEwParams<T>);
#define LEAKY_EW_ALL(T) LEAKY_STACK_ACTIVATIONS(LEAKY_EW, T)
LEAKY_STACK_TYPES(LEAKY_EW_ALL)

#define LEAKY_FALLBACK(ACT, T, TG) \
  template __global__ void leaky_stack_tw_fallback_kernel<T, TG, ACT>(const TwFallbackParams<T, TG>);
#define LEAKY_FALLBACK_ALL(T, TG) LEAKY_STACK_ACTIVATIONS(LEAKY_FALLBACK, T, TG)
LEAKY_STACK_FALLBACK_INSTANCES(LEAKY_FALLBACK_ALL)

#define LEAKY_DW(ACT, T, MMA) template __global__ void leaky_stack_dw_kernel<T, MMA, ACT>(const DwParams<T>);
#define LEAKY_DW_ALL(T, MMA) LEAKY_STACK_ACTIVATIONS(LEAKY_DW, T, MMA)
LEAKY_STACK_DW_INSTANCES(LEAKY_DW_ALL)

}  // namespace kernels
}  // namespace leakycuda
