// Body of one generated compile unit (csrc/gen_units.py) of the CUDA leaky-stack launches: the forward and
// backward of storage type LEAKY_STACK_UNIT_TYPE and activation Act::LEAKY_STACK_UNIT_ACT, and so every
// kernel instance of that type and activation (the list: kernels/leaky_stack_instances.cuh).
#pragma once

#include "leaky_stack_launch.cuh"

#if !defined(LEAKY_STACK_UNIT_TYPE) || !defined(LEAKY_STACK_UNIT_ACT)
#error "define LEAKY_STACK_UNIT_TYPE and LEAKY_STACK_UNIT_ACT (a generated unit does) before including this file"
#endif

namespace leakycuda {
namespace stack_cuda {
LEAKY_STACK_LAUNCHES(, aten_t<LEAKY_STACK_UNIT_TYPE>, Act::LEAKY_STACK_UNIT_ACT)
}  // namespace stack_cuda
}  // namespace leakycuda
