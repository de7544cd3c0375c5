// CUDA entry points of the COI / K-norm / energies ops: each runs the device-generic implementation
// (csrc/generic/energies_aten.cpp, batched float64 ATen calls) on the tensors' device.
#include <torch/library.h>

#include "../energies.h"

TORCH_LIBRARY_IMPL(leakycuda, CUDA, m) {
  m.impl("cost_of_identity", &leakycuda::cost_of_identity_aten);
  m.impl("cost_of_identity_backward", &leakycuda::cost_of_identity_backward_aten);
  m.impl("k_norm2", &leakycuda::k_norm2_aten);
  m.impl("k_norm2_backward", &leakycuda::k_norm2_backward_aten);
  m.impl("energies", &leakycuda::energies_aten);
  m.impl("energies_backward", &leakycuda::energies_backward_aten);
}
