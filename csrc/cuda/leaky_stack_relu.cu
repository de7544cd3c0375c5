// The CUDA leaky-stack launches (and so every kernel instance) for activation="relu"; see leaky_stack_launch.cuh.
#include "leaky_stack_launch.cuh"

namespace leakycuda {
namespace stack_cuda {
LEAKY_STACK_LAUNCHES(, k::Act::kRelu)
}  // namespace stack_cuda
}  // namespace leakycuda
