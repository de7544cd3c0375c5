"""Loads the compiled ops (torch.ops.leakycuda.*) and registers their fake and autograd implementations."""
import glob
import os
import sys

import torch

def _where():
    """(this package's folder, the source checkout it sits in or None): a checkout has setup.py beside the package."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(pkg)
    return pkg, (root if os.path.isfile(os.path.join(root, "setup.py")) else None)


def _installed_copies(pkg):
    """Other leakycuda folders on sys.path that hold a compiled extension (e.g. a non-editable install)."""
    found = []
    for entry in sys.path:
        other = os.path.join(os.path.abspath(entry or os.curdir), "leakycuda")
        if other != pkg and other not in found and glob.glob(os.path.join(other, "_C*.so")) + glob.glob(
                os.path.join(other, "_C*.pyd")):
            found.append(other)
    return found


def _rebuild_hint():
    pkg, root = _where()
    if root is not None:
        return "rebuild it in place: cd %s && pip install --no-build-isolation -e ." % root
    return ("reinstall it from its source checkout: pip install --no-build-isolation --no-deps --force-reinstall "
            "<path to the leakycuda checkout> (this copy is %s)" % pkg)


def _load():
    """Imports the compiled extension, or raises an ImportError that says what is wrong and how to fix it."""
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
                % (built + (torch.__version__, torch.version.cuda, _rebuild_hint()))
            )
    try:
        from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        pkg, root = _where()
        if glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd")):
            raise ImportError("leakycuda's compiled extension in %s exists but could not be loaded (%s); it was "
                              "probably built against another torch or Python; %s" % (pkg, e, _rebuild_hint())) from e
        if root is not None:
            others = _installed_copies(pkg)
            alt = (" or run Python from another folder to use the installed copy in %s" % others[0]) if others else ""
            raise ImportError(
                "leakycuda was imported from its source checkout %s, which has no compiled extension (no "
                "leakycuda/_C*.so there): Python looks in the current folder (and PYTHONPATH) before the installed "
                "packages, so this folder shadows any installed copy. Build the extension in place: cd %s && pip "
                "install --no-build-isolation -e .%s" % (pkg, root, alt)) from e
        raise ImportError("leakycuda's compiled extension is missing from %s (%s); %s" % (pkg, e, _rebuild_hint())) from e
    return _build_info


build_info = _load()
ops = torch.ops.leakycuda


def num_states(L, k):
    """How many representations the forward keeps for backward at checkpoint interval k."""
    return -(-L // k)


# The ops' fake (meta) implementations are C++ Meta kernels (csrc/generic/leaky_stack_checks.cpp) that
# run the kernels' own argument checks on symbolic sizes; leaky_layer(_backward) reach them through the
# stack ops.


def _leaky_stack_setup(ctx, inputs, output):
    _, W, rho, Lt, return_all, checkpoint, activation, model_Lt = inputs
    out, states = output
    ctx.mark_non_differentiable(states)
    # No zero-filled gradient for states (as large as the saved representations) on every backward.
    ctx.set_materialize_grads(False)
    ctx.Lt, ctx.activation = Lt, activation
    # With every X_l returned, backward reads them from the output itself (interval 1).
    ctx.k = 1 if return_all else checkpoint
    ctx.save_for_backward(out if return_all else states, W, rho, model_Lt)


def _leaky_stack_grad(ctx, dout, dstates):
    if dout is None:  # no gradient reached out (gradcheck's undefined-output-grad check does this)
        return None, None, None, None, None, None, None, None
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
