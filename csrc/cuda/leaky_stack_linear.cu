// The CUDA leaky-stack launches (and so every kernel instance) for activation="linear"; see leaky_stack_launch.cuh.
#include "leaky_stack_launch.cuh"

namespace leakycuda {
namespace stack_cuda {
LEAKY_STACK_LAUNCHES(, k::Act::kLinear)
}  // namespace stack_cuda
}  // namespace leakycuda
