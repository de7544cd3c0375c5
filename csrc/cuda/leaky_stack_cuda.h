// CUDA entry points of the leaky-stack ops (registered for the CUDA dispatch key in leaky_stack.cu).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace leakycuda {

std::tuple<at::Tensor, at::Tensor> leaky_stack_cuda(const at::Tensor& x0, const at::Tensor& W,
                                                    const at::Tensor& rho, double Lt, bool return_all,
                                                    int64_t checkpoint);

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cuda(const at::Tensor& grad,
                                                                         const at::Tensor& states,
                                                                         const at::Tensor& W,
                                                                         const at::Tensor& rho, double Lt,
                                                                         int64_t checkpoint);

}  // namespace leakycuda
