// CUDA entry points of leaky_stack / leaky_stack_backward: check arguments, lay the tensors out model-first, and
// launch the instance of the dtype and activation (leaky_stack_launch.cuh) on torch's current stream.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../leaky_stack.h"
#include "leaky_stack_launch.cuh"

namespace leakycuda {
namespace {

using at::Tensor;
using namespace stack_cuda;  // the launch templates and helpers

// The torch-free kernels' name of the op's activation (for visit_activation from leaky_stack.h).
constexpr k::Act kernel_act(Activation act) { return act == Activation::kRelu ? k::Act::kRelu : k::Act::kLinear; }

// The model-first view the kernels index: t itself for B models, t with a leading [1] for one model.
Tensor as_models(const Tensor& t, const StackDims& d) { return d.models ? t : t.unsqueeze(0); }

Launch make_launch(const StackDims& d, double Lt, const Tensor& model_Lt, const Tensor& like) {
  const int dev = like.get_device();
  return Launch{d.B, d.L, d.N, d.w, Lt, model_Lt.defined() ? model_Lt.data_ptr<double>() : nullptr,
                at::globalContext().allowTF32CuBLAS(), device_info(dev), dev, c10::cuda::getCurrentCUDAStream()};
}

}  // namespace

std::tuple<Tensor, Tensor> leaky_stack_cuda(const Tensor& x0, const Tensor& W, const Tensor& rho, double Lt,
                                            bool return_all, int64_t checkpoint, c10::string_view activation,
                                            const c10::optional<Tensor>& model_Lt) {
  const StackDims dims = check_stack_args(x0, W, rho, Lt, checkpoint, activation, model_Lt, /*allow_half=*/true);
  c10::cuda::CUDAGuard guard(x0.device());
  if (!capturing()) {  // the value checks read rho and model_Lt on the host
    check_rho_values(rho);
    check_model_Lt_values(model_Lt);
  }
  // The ATen calls below write into preallocated buffers: keep autograd out of them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = dims.B, L = dims.L, N = dims.N;
  const int64_t S = return_all ? 0 : num_states(L, checkpoint);
  Tensor out, states;
  std::tie(out, states) = empty_stack_outputs(dims, return_all, checkpoint, x0.options());
  // Model-first views: x [B, N, w], Wc [B, L, w, w+1], rc [B, L], outB [B, (L+1,) N, w], statesB [B, S, N, w].
  const Tensor x = as_models(x0, dims).contiguous(), Wc = as_models(W, dims).contiguous();
  const Tensor rc = rho.reshape({B, L}).contiguous();
  const Tensor mlt = model_Lt.has_value() ? model_Lt->contiguous() : Tensor();
  Tensor outB = as_models(out, dims), statesB = as_models(states, dims);
  if (return_all) outB.select(1, 0).copy_(x);
  else if (S > 0) statesB.select(1, 0).copy_(x);
  if (L == 0 && !return_all) outB.copy_(x);
  if (L == 0 || N == 0 || B == 0) return {out, states};

  const Launch c = make_launch(dims, Lt, mlt, x0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "leaky_stack_cuda", [&] {
    visit_activation(dims.act, [&](auto act) {
      stack_forward<scalar_t, kernel_act(decltype(act)::value)>(c, x, Wc, rc, return_all, checkpoint, outB, statesB);
    });
  });
  return {out, states};
}

std::tuple<Tensor, Tensor, Tensor> leaky_stack_backward_cuda(const Tensor& grad, const Tensor& states, const Tensor& W,
                                                             const Tensor& rho, double Lt, int64_t checkpoint,
                                                             c10::string_view activation,
                                                             const c10::optional<Tensor>& model_Lt) {
  const StackDims dims =
      check_stack_backward_args(grad, states, W, rho, Lt, checkpoint, activation, model_Lt, /*allow_half=*/true);
  c10::cuda::CUDAGuard guard(grad.device());
  if (!capturing()) {
    check_rho_values(rho);
    check_model_Lt_values(model_Lt);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = dims.B, L = dims.L, N = dims.N, w = dims.w;
  const bool per_layer = grad.dim() == (dims.models ? 4 : 3);
  Tensor dx0, dW, drho;
  std::tie(dx0, dW, drho) = empty_stack_grads(dims, grad.options());
  // Model-first views: g [B, (L+1,) N, w], st [B, S', N, w], Wc [B, L, w, w+1], rc [B, L].
  const Tensor g = as_models(grad, dims).contiguous(), st = as_models(states, dims).contiguous();
  const Tensor Wc = as_models(W, dims).contiguous(), rc = rho.reshape({B, L}).contiguous();
  const Tensor mlt = model_Lt.has_value() ? model_Lt->contiguous() : Tensor();
  Tensor dx0B = as_models(dx0, dims), dWB = as_models(dW, dims), drhoB = drho.view({B, L});
  if (L == 0) {
    dx0B.copy_(per_layer ? g.select(1, 0) : g);
    return {dx0, dW, drho};
  }
  if (N == 0 || w == 0 || B == 0) {
    dW.zero_();
    drho.zero_();
    return {dx0, dW, drho};
  }

  const Launch c = make_launch(dims, Lt, mlt, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "leaky_stack_backward_cuda", [&] {
    visit_activation(dims.act, [&](auto act) {
      stack_backward<scalar_t, kernel_act(decltype(act)::value)>(c, per_layer, g, st, Wc, rc, mlt, checkpoint, dx0B,
                                                                 dWB, drhoB);
    });
  });
  return {dx0, dW, drho};
}

}  // namespace leakycuda
