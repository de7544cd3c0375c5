// Torch-free body of one generated compile unit (csrc/gen_units.py): instantiates every kernel of the
// instance list (leaky_stack_instances.cuh) whose storage type is LEAKY_STACK_UNIT_TYPE, for activation
// Act::LEAKY_STACK_UNIT_ACT -- the kernels the launcher unit of the same type and activation builds -- so
// that CI compiles all device code with nvcc alone (sm_80 and sm_90), one unit per (type, activation).
#pragma once

#include <type_traits>

#include "leaky_stack_instances.cuh"

#if !defined(LEAKY_STACK_UNIT_TYPE) || !defined(LEAKY_STACK_UNIT_ACT)
#error "define LEAKY_STACK_UNIT_TYPE and LEAKY_STACK_UNIT_ACT (a generated unit does) before including this file"
#endif

namespace leakycuda {
namespace kernels {

// Taking a kernel's address instantiates it (device code included); `if constexpr` keeps the instances of
// other storage types out of this unit.
template <typename T, Act kAct>
void leaky_stack_unit_instances() {
#define LEAKY_MMA_FWD(KIND, BUCKET, MT) \
  if constexpr (std::is_same_v<KIND::T, T>) (void)&leaky_stack_fwd_kernel<MmaCore<KIND, BUCKET, MT>, kAct>;
  LEAKY_STACK_MMA_FWD_INSTANCES(LEAKY_MMA_FWD)
#undef LEAKY_MMA_FWD

#define LEAKY_MMA_BWD(KIND, BUCKET, MT) \
  if constexpr (std::is_same_v<KIND::T, T>) (void)&leaky_stack_bwd_kernel<MmaCore<KIND, BUCKET, MT>, kAct>;
  LEAKY_STACK_MMA_BWD_INSTANCES(LEAKY_MMA_BWD)
#undef LEAKY_MMA_BWD

#define LEAKY_FMA(TYPE, BUCKET)                                     \
  if constexpr (std::is_same_v<TYPE, T>) {                          \
    (void)&leaky_stack_fwd_kernel<FmaCore<TYPE, BUCKET>, kAct>;     \
    (void)&leaky_stack_bwd_kernel<FmaCore<TYPE, BUCKET>, kAct>;     \
  }
  LEAKY_STACK_FMA_INSTANCES(LEAKY_FMA)
#undef LEAKY_FMA

#define LEAKY_TYPE(TYPE)                                \
  if constexpr (std::is_same_v<TYPE, T>) {              \
    (void)&leaky_stack_pack_kernel<TYPE, TYPE>;         \
    (void)&leaky_stack_drho_kernel<TYPE>;               \
    (void)&leaky_stack_fwd_ew_kernel<TYPE, kAct>;       \
    (void)&leaky_stack_bwd_ew_kernel<TYPE, kAct>;       \
  }
  LEAKY_STACK_TYPES(LEAKY_TYPE)
#undef LEAKY_TYPE

#define LEAKY_FALLBACK(TYPE, TG) \
  if constexpr (std::is_same_v<TYPE, T>) (void)&leaky_stack_tw_fallback_kernel<TYPE, TG, kAct>;
  LEAKY_STACK_FALLBACK_INSTANCES(LEAKY_FALLBACK)
#undef LEAKY_FALLBACK

#define LEAKY_DW(TYPE, MMA) if constexpr (std::is_same_v<TYPE, T>) (void)&leaky_stack_dw_kernel<TYPE, MMA, kAct>;
  LEAKY_STACK_DW_INSTANCES(LEAKY_DW)
#undef LEAKY_DW
}

template void leaky_stack_unit_instances<LEAKY_STACK_UNIT_TYPE, Act::LEAKY_STACK_UNIT_ACT>();

}  // namespace kernels
}  // namespace leakycuda
