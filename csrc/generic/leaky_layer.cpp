// The one-layer op leaky_layer (and its backward): device-generic, it checks its arguments in its own
// terms and runs as a one-layer stack through the dispatcher, so it serves every device the stack op does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../leaky_stack.h"

namespace leakycuda {

// One leaky residual layer as a one-layer stack; dispatches to the stack op of x's device.
at::Tensor leaky_layer(const at::Tensor& x, const at::Tensor& W, const at::Tensor& rho, double Lt,
                       c10::string_view activation) {
  check_layer_args(nullptr, x, W, rho, Lt, activation);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("leakycuda::leaky_stack", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, bool,
                                                                 int64_t, c10::string_view,
                                                                 const c10::optional<at::Tensor>&)>();
  return std::get<0>(op.call(x, W.unsqueeze(0), rho.reshape({1}), Lt, false, 1, activation, c10::nullopt));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> leaky_layer_backward(const at::Tensor& grad,
                                                                    const at::Tensor& x,
                                                                    const at::Tensor& W,
                                                                    const at::Tensor& rho,
                                                                    double Lt,
                                                                    c10::string_view activation) {
  check_layer_args(&grad, x, W, rho, Lt, activation);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("leakycuda::leaky_stack_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, double, int64_t, c10::string_view,
                           const c10::optional<at::Tensor>&)>();
  auto [dx, dW, drho] =
      op.call(grad, x.unsqueeze(0), W.unsqueeze(0), rho.reshape({1}), Lt, 1, activation, c10::nullopt);
  return {dx, dW.squeeze(0), drho.reshape_symint(rho.sym_sizes())};
}

}  // namespace leakycuda
