// CUDA entry points of the leaky-stack ops (registered for the CUDA dispatch key in leaky_stack.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace leakycuda {

// Same contract as leaky_stack_cpu (csrc/leaky_stack.h): one model (x0 [N, w], W [L, w, w+1], rho [L])
// or B models (x0 [B, N, w], W [B, L, w, w+1], rho [B, L], model_Lt None or float64 [B] on x0's device).
std::tuple<at::Tensor, at::Tensor> leaky_stack_cuda(const at::Tensor& x0, const at::Tensor& W,
                                                    const at::Tensor& rho, double Lt, bool return_all,
                                                    int64_t checkpoint, c10::string_view activation,
                                                    const c10::optional<at::Tensor>& model_Lt);

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_stack_backward_cuda(
    const at::Tensor& grad, const at::Tensor& states, const at::Tensor& W, const at::Tensor& rho, double Lt,
    int64_t checkpoint, c10::string_view activation, const c10::optional<at::Tensor>& model_Lt);

}  // namespace leakycuda
