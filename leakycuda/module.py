"""LeakyResNet: the nn.Module of a Leaky ResNet (projections around a stack of leaky layers), docs/DESIGN.md §1 and §3."""
import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from . import _validate as check
from . import steps as _steps
from .functional import check_activation, checkpoint_interval, leaky_stack

__all__ = ["LeakyResNet"]

STEP_SCHEMES = ("equidistant", "irregular", "adaptive")
INITS = ("random", "identity")
_STATE_VERSION = 1
# Floating dtypes the stack op runs in on each device.
_DTYPES = {"cpu": (torch.float32, torch.float64),
           "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _positive_int(value, name, what):
    return check.integer(value, name, low=1, what=what)


def _check_factory(device, dtype):
    """LeakyResNet(device=, dtype=): a floating dtype the stack op supports on that device."""
    device = check.device(device) or torch.get_default_device()
    dtype = check.float_dtype(dtype if dtype is not None else torch.get_default_dtype())
    allowed = _DTYPES.get(device.type)
    if allowed is not None and dtype not in allowed:
        check.fail(TypeError, "dtype", "one of %s on %s (the dtypes the leaky stack runs in there)"
                   % (", ".join(str(d) for d in allowed), device.type), str(dtype))


def check_effective_depth(value):
    """Lt as a float: a finite real number >= 0 (or a one-element tensor holding one); TypeError or ValueError
    naming effective_depth otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("effective_depth must be a real number Lt >= 0, got %r" % (value,))
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError("effective_depth must be a finite real number Lt >= 0, got %r" % (value,))
    return value


class SavedSettings:
    """State-dict loading for modules whose extra state holds settings (a mixin before nn.Module).

    The saved ``activation`` must equal the module's. The settings named in ``_MUST_MATCH`` must too
    under strict loading (ValueError naming them); ``load_state_dict(..., strict=False)`` adopts them
    with a warning. Both checks run before any tensor is copied in (call :meth:`_check_saved_settings`
    first in ``_load_from_state_dict``).
    """

    #: Settings a loaded state dict must agree on (strict loading), or that it replaces (strict=False).
    _MUST_MATCH = ()

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As ``nn.Module.load_state_dict``; ``strict=False`` also adopts other saved settings (see the class)."""
        self._adopt_settings = not strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._adopt_settings

    def _check_saved_activation(self, saved):
        activation = saved.get("activation", "relu")  # state dicts from before the option are relu
        if activation != self.activation:
            raise ValueError("the state dict was saved from a %s with activation=%r, this one has activation=%r; "
                             "build the model with activation=%r to load it"
                             % (type(self).__name__, activation, self.activation, activation))

    def _check_saved_settings(self, saved):
        # torch passes strict=True to _load_from_state_dict whatever the caller asked; load_state_dict records it.
        if not isinstance(saved, dict):
            return
        self._check_saved_activation(saved)
        kind = type(self).__name__
        mine = self.get_extra_state()
        diff = [k for k in self._MUST_MATCH if k in saved and saved[k] != mine[k]]
        if diff:
            what = ", ".join("%s=%r (this model: %r)" % (k, saved[k], mine[k]) for k in diff)
            if not getattr(self, "_adopt_settings", False):
                check.fail(ValueError, "state_dict", "saved from a %s with this model's settings; build the model "
                           "with the saved ones, or load with strict=False to adopt them" % kind,
                           "one saved with %s" % what)
            warnings.warn("%s.load_state_dict(strict=False): adopting the saved %s" % (kind, what), stacklevel=6)


class LeakyResNet(SavedSettings, nn.Module):
    """A Leaky ResNet: x [N, d_in] -> X_0 = x P_in^T -> L leaky layers -> y = X_L P_out^T [N, d_out].

    Leaky layer l = 1..L (docs/DESIGN.md §1), with sigma(X) = [relu(X), 1] (or [X, 1], see ``activation``)
    and W_l = [V_l | b_l]:
    ``X_l = (1 - rho_l*Lt) X_{l-1} + rho_l * sigma(X_{l-1}) @ W_l^T``.

    Args:
        in_features, out_features: d_in, d_out.
        width: w, the width of every representation X_l [N, w].
        depth: L, the number of leaky layers.
        effective_depth: Lt >= 0 (0: a plain ResNet; rho_l*Lt = 1: a fully-connected layer).
        steps: the layer-step scheme of the buffer ``rho`` [L]: "equidistant" (1/L), "irregular"
            (see :func:`leakycuda.steps.step_sizes`, parameter ``a``) or "adaptive" (starts
            equidistant; :meth:`adapt_steps` updates it from the representations of a batch).
        learn_projections: P_in [w, d_in] and P_out [d_out, w] are Parameters when True, fixed
            random buffers (saved in the state dict) when False.
        a: the irregular-scheme parameter in [0, 1); only with ``steps="irregular"``.
        init: "random" or "identity" (see :meth:`reset_parameters`). The choice matters at large Lt:
            the leak shrinks the signal by about e^{-Lt} across the stack, and a random init only
            partly counters it. In float32 (L=20, w=100, Adam) a random init trained at Lt = 7 but
            collapsed to all-zero weights at Lt = 12; "identity" (V_l ≈ Lt*I + noise) cancels the
            leak on the positive part of X from the start and trains at Lt = 12, but its weights
            keep many large singular values long into training (6000 steps), which hides the
            low-rank bottleneck the theory predicts and costs regularization. Use "random" for
            moderate Lt (up to ~7-10) and when studying the learned weight spectra; "identity" to
            make large Lt trainable at all.
        checkpoint: None (keep every X_l for backward), an int k (keep every k-th, recompute the
            rest) or "sqrt" (k = ceil(sqrt(L))); passed to ``leaky_stack`` in :meth:`forward`.
        activation: "relu" (sigma(X) = [relu(X), 1]) or "linear" (sigma(X) = [X, 1]; with
            rho_l*Lt = 1 a deep linear network). Saved in the state dict; loading one saved with
            another activation raises ValueError.
        device, dtype: as in ``torch.nn.Linear``; dtype float32 or float64 on CPU, also float16 and
            bfloat16 on CUDA. Inputs must have the model's dtype and device (no silent casts).

    Attributes:
        weight: [L, w, w+1] Parameter, weight[l] = W_{l+1} = [V | b].
        proj_in: [w, d_in]; proj_out: [d_out, w].
        rho: [L] buffer of layer steps (in the state dict).
        effective_depth (alias ``Lt``): a Python float, saved in the state dict (extra state) with
            the step scheme, so that ``torch.load(..., weights_only=True)`` restores both.

    A warning (not an error) is raised whenever some rho_l * Lt > 1 (at construction, after
    :meth:`adapt_steps`, when Lt is set or a state dict is loaded): the skip connection changes
    sign there.

    ``load_state_dict`` refuses (ValueError) a state dict saved with another effective depth, step
    scheme or irregularity ``a`` than this model's; with ``strict=False`` it adopts the saved ones
    and warns.
    """

    def __init__(self, in_features, out_features, width, depth, effective_depth, steps="equidistant",
                 learn_projections=True, *, a=0.0, init="random", checkpoint=None, activation="relu",
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        _check_factory(device, dtype)
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features", "d_in, the input size")
        self.out_features = _positive_int(out_features, "out_features", "d_out, the output size")
        self.width = _positive_int(width, "width", "w, the width of the representations")
        self.depth = _positive_int(depth, "depth", "L, the number of leaky layers")
        self._effective_depth = check_effective_depth(effective_depth)
        self.steps = _steps.check_scheme(steps, STEP_SCHEMES, name="steps")
        self.a = _steps.check_irregularity(a)
        if self.a != 0.0 and self.steps != "irregular":
            raise ValueError("a = %r is the irregular-scheme parameter but steps = %r; pass a = 0 or "
                             "steps = 'irregular'" % (self.a, self.steps))
        self.init = _steps.check_scheme(init, INITS, name="init")
        if not isinstance(learn_projections, bool):
            raise TypeError("learn_projections must be True or False, got %r" % (learn_projections,))
        self.learn_projections = learn_projections
        checkpoint_interval(self.depth, checkpoint)  # validates: None, "sqrt" or an int k >= 1
        self.checkpoint = checkpoint
        self.activation = check_activation(activation)

        L, w = self.depth, self.width
        self.weight = nn.Parameter(torch.empty(L, w, w + 1, **factory_kwargs))
        proj_in = torch.empty(w, self.in_features, **factory_kwargs)
        proj_out = torch.empty(self.out_features, w, **factory_kwargs)
        if learn_projections:
            self.proj_in = nn.Parameter(proj_in)
            self.proj_out = nn.Parameter(proj_out)
        else:
            self.register_buffer("proj_in", proj_in)
            self.register_buffer("proj_out", proj_out)
        self.register_buffer("rho", torch.empty(L, **factory_kwargs))
        self.reset_parameters()
        _steps.warn_if_overshoot(self.rho, self.Lt, where="LeakyResNet")

    # -- effective depth ----------------------------------------------------------------------
    @property
    def effective_depth(self):
        """Lt, the effective depth (a float >= 0)."""
        return self._effective_depth

    @effective_depth.setter
    def effective_depth(self, value):
        self._effective_depth = check_effective_depth(value)
        _steps.warn_if_overshoot(self.rho, self._effective_depth, where="LeakyResNet.effective_depth")

    @property
    def Lt(self):
        """Alias of :attr:`effective_depth`."""
        return self._effective_depth

    @Lt.setter
    def Lt(self, value):
        self.effective_depth = value

    # -- parameters -----------------------------------------------------------------------------
    def initial_steps(self):
        """The steps rho [L] of the scheme before any adaptation (equidistant for "adaptive")."""
        scheme = "irregular" if self.steps == "irregular" else "equidistant"
        return _steps.step_sizes(self.depth, scheme, self.a if scheme == "irregular" else 0.0,
                                 dtype=self.rho.dtype, device=self.rho.device)

    def reset_parameters(self):
        """Re-initialises the weights and projections and resets rho to the scheme's initial steps.

        - V_l ~ N(0, 2/w) i.i.d. (He scale: sigma(X) V_l^T has about the scale of X, so at
          rho_l*Lt = 1 a layer is a He-initialised dense ReLU layer and at Lt = 0 the stack neither
          explodes nor dies: |X_L|/|X_0| ≈ 1). The layers' noise averages out over the stack, so
          with a random init |X_L|/|X_0| ≈ (1 - Lt/L)^L ≈ e^{-Lt} whatever the scale: fine for
          moderate Lt (e^{-3} ≈ 0.05 is undone by the learned projections), vanishing at large Lt.
        - ``init="identity"``: V_l = Lt*I + N(0, 2/w) noise. On the positive part of X the leak
          and the residual branch cancel (relu(X) Lt - Lt X = 0), so |X_L| stays O(|X_0|) for every
          Lt (about 0.7 |X_0|: the negative part decays). For Lt = 0 it equals the random init.
        - b_l = 0.
        - P_in ~ N(0, 1/d_in), P_out ~ N(0, 1/w) (variance 1/fan_in), learned or fixed alike.
        - rho: the scheme's initial steps (:meth:`initial_steps`).
        """
        w = self.width
        with torch.no_grad():
            self.weight.zero_()
            V = self.weight[:, :, :w]
            V.normal_(0.0, math.sqrt(2.0 / w))
            if self.init == "identity" and self.Lt != 0.0:
                V.diagonal(dim1=-2, dim2=-1).add_(self.Lt)
            self.proj_in.normal_(0.0, math.sqrt(1.0 / self.in_features))
            self.proj_out.normal_(0.0, math.sqrt(1.0 / w))
            self.rho.copy_(self.initial_steps())

    # -- forward --------------------------------------------------------------------------------
    def _embed(self, x):
        check.tensor(x, "x", "[N, in_features] = [N, %d]" % self.in_features)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            check.fail(ValueError, "x", "[N, in_features] = [N, %d]" % self.in_features, "shape %s" % (list(x.shape),))
        P = self.proj_in
        if P.dtype not in _DTYPES.get(P.device.type, (P.dtype,)):
            check.fail(TypeError, "the model's dtype", "one of %s on %s (convert it with model.to(...))"
                       % (", ".join(map(str, _DTYPES[P.device.type])), P.device.type), str(P.dtype))
        if x.dtype != P.dtype:
            check.fail(TypeError, "x", "of the model's dtype %s (cast it with x.to(%s), or the model with "
                       "model.to(%s))" % (P.dtype, P.dtype, x.dtype), str(x.dtype))
        if x.device != P.device:
            check.fail(ValueError, "x", "on the model's device %s" % P.device, str(x.device))
        return x @ P.transpose(0, 1)

    def forward(self, x):
        """x: [N, d_in] -> y: [N, d_out] = leaky_stack(x P_in^T, W, rho, Lt) P_out^T."""
        X = leaky_stack(self._embed(x), self.weight, self.rho, self._effective_depth,
                        checkpoint=self.checkpoint, activation=self.activation)
        return X @ self.proj_out.transpose(0, 1)

    def representations(self, x):
        """x: [N, d_in] -> every representation X_0..X_L: [L+1, N, w] (differentiable)."""
        return leaky_stack(self._embed(x), self.weight, self.rho, self._effective_depth, return_all=True,
                           activation=self.activation)

    def regularization(self, lam):
        """lam/(2*Lt) * sum_l rho_l ||W_l||_F^2 (lam/2 * ... when Lt = 0): a 0-d tensor, differentiable in weight.

        Add it to the data cost: loss = C(y) + model.regularization(lam). rho is treated as a constant.
        """
        if not isinstance(lam, torch.Tensor):
            lam = check.real(lam, "lam", low=0.0, what="the regularization strength")
        scale = lam / 2.0 if self._effective_depth == 0.0 else lam / (2.0 * self._effective_depth)
        norms = self.weight.square().sum(dim=(1, 2))
        return scale * (self.rho.detach() * norms).sum()

    def adapt_steps(self, x, *, reduce=None, eps=1e-8):
        """One adaptive update of rho from the batch x [N, d_in]; returns the new rho [L] (a copy).

        Computes the representations without autograd, then
        rho <- :func:`leakycuda.steps.adaptive_step_sizes` (c_l = ||X_l - X_{l-1}|| / (rho_l ||X_l||),
        rho_l ∝ 1/c_l), in place. Only for ``steps="adaptive"``.

        ``reduce``: under data parallelism pass a callable that sums the [2, L] float64 statistics
        over ranks, e.g. ``torch.distributed.all_reduce`` (in place; SUM is its default), so that
        every rank computes the same steps from the full batch. Without it each rank adapts to its
        own shard (DDP's buffer broadcast would then impose rank 0's steps). Warns when some
        rho_l * Lt > 1 afterwards.
        """
        if self.steps != "adaptive":
            raise RuntimeError("adapt_steps needs a model built with steps='adaptive', this one has steps=%r"
                               % (self.steps,))
        with torch.no_grad():
            xs = self.representations(x)
            new = _steps.adaptive_step_sizes(xs, self.rho, eps=eps, reduce=reduce)
            self.rho.copy_(new)
        _steps.warn_if_overshoot(self.rho, self._effective_depth, where="LeakyResNet.adapt_steps")
        return self.rho.clone()

    # -- state dict ------------------------------------------------------------------------------
    def get_extra_state(self):
        """Lt, the step scheme and the activation, as plain Python values (loadable with weights_only=True)."""
        return {"version": _STATE_VERSION, "effective_depth": self._effective_depth, "steps": self.steps,
                "a": self.a, "init": self.init, "activation": self.activation}

    _MUST_MATCH = ("effective_depth", "steps", "a")

    def set_extra_state(self, state):
        if not isinstance(state, dict) or "effective_depth" not in state or "steps" not in state:
            check.fail(ValueError, "the state dict's LeakyResNet extra state", "a dict with 'effective_depth' and "
                       "'steps' (written by get_extra_state)", repr(state))
        self._check_saved_activation(state)
        self._effective_depth = check_effective_depth(state["effective_depth"])
        self.steps = _steps.check_scheme(state["steps"], STEP_SCHEMES, name="steps")
        self.a = _steps.check_irregularity(state.get("a", 0.0))
        self.init = _steps.check_scheme(state.get("init", self.init), INITS, name="init")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_saved_settings(state_dict.get(prefix + _EXTRA_STATE_KEY_SUFFIX))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        _steps.warn_if_overshoot(self.rho, self._effective_depth, where="LeakyResNet.load_state_dict",
                                 stacklevel=5)

    def extra_repr(self):
        s = ("in_features={}, out_features={}, width={}, depth={}, effective_depth={:g}, steps={!r}"
             .format(self.in_features, self.out_features, self.width, self.depth, self._effective_depth,
                     self.steps))
        if self.steps == "irregular":
            s += ", a={:g}".format(self.a)
        s += ", learn_projections={}, init={!r}, activation={!r}".format(self.learn_projections, self.init,
                                                                         self.activation)
        if self.checkpoint is not None:
            s += ", checkpoint={!r}".format(self.checkpoint)
        return s
