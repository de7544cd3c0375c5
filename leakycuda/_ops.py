"""Loads the compiled ops (torch.ops.leakycuda.*) and registers their fake and autograd implementations."""
import torch

_REBUILD = "rebuild it: pip install --no-build-isolation --no-deps --force-reinstall ."


def _load():
    try:
        from . import _build_info
    except ImportError:
        _build_info = None
    if _build_info is not None:
        built = (_build_info.torch_version, _build_info.cuda_version)
        if _build_info.torch_version != torch.__version__ or (
            _build_info.cuda_version is not None and _build_info.cuda_version != torch.version.cuda
        ):
            raise ImportError(
                "leakycuda was built against torch %s (CUDA %s) but torch %s (CUDA %s) is installed; %s"
                % (built + (torch.__version__, torch.version.cuda, _REBUILD))
            )
    try:
        from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        raise ImportError("leakycuda's compiled extension could not be loaded (%s); %s" % (e, _REBUILD)) from e
    return _build_info


build_info = _load()
ops = torch.ops.leakycuda


def num_states(L, k):
    """How many representations the forward keeps for backward at checkpoint interval k."""
    return -(-L // k)


# The ops' fake (meta) implementations are C++ Meta kernels (csrc/ops.cpp) that run the kernels' own
# argument checks on symbolic sizes; leaky_layer(_backward) reach them through the stack ops.


def _leaky_stack_setup(ctx, inputs, output):
    _, W, rho, Lt, return_all, checkpoint, activation, model_Lt = inputs
    out, states = output
    ctx.mark_non_differentiable(states)
    ctx.Lt, ctx.activation = Lt, activation
    # With every X_l returned, backward reads them from the output itself (interval 1).
    ctx.k = 1 if return_all else checkpoint
    ctx.save_for_backward(out if return_all else states, W, rho, model_Lt)


def _leaky_stack_grad(ctx, dout, dstates):
    saved, W, rho, model_Lt = ctx.saved_tensors
    dx0, dW, drho = ops.leaky_stack_backward(dout, saved, W, rho, ctx.Lt, ctx.k, ctx.activation, model_Lt)
    return dx0, dW, drho, None, None, None, None, None


def _leaky_layer_setup(ctx, inputs, output):
    x, W, rho, Lt, activation = inputs
    ctx.Lt, ctx.activation = Lt, activation
    ctx.save_for_backward(x, W, rho)


def _leaky_layer_grad(ctx, grad):
    x, W, rho = ctx.saved_tensors
    dx, dW, drho = ops.leaky_layer_backward(grad, x, W, rho, ctx.Lt, ctx.activation)
    return dx, dW, drho, None, None


torch.library.register_autograd("leakycuda::leaky_stack", _leaky_stack_grad, setup_context=_leaky_stack_setup)
torch.library.register_autograd("leakycuda::leaky_layer", _leaky_layer_grad, setup_context=_leaky_layer_setup)


def _no_double_backward(name):
    def grad(ctx, *grads):
        raise RuntimeError("leakycuda::%s is not differentiable: double backward through the leaky stack is not "
                           "supported (use leakycuda.reference for higher-order gradients)" % name)
    return grad


for _name in ("leaky_stack_backward", "leaky_layer_backward"):
    torch.library.register_autograd("leakycuda::" + _name, _no_double_backward(_name),
                                    setup_context=lambda ctx, inputs, output: None)
