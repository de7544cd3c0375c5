"""LeakyResNet: the nn.Module of a Leaky ResNet (projections around a stack of leaky layers), docs/DESIGN.md §1 and §3."""
import math
import numbers
import warnings
from collections.abc import Mapping

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


def _check_lam(lam, name="lam"):
    """A regularization strength: a finite number >= 0 (a tensor passes as it is: it may be a traced value)."""
    if isinstance(lam, torch.Tensor):
        return lam
    return check.real(lam, name, low=0.0, what="the regularization strength")


def _check_input(x, weight, expect, fits):
    """x for a model whose parameters are like ``weight``: a tensor for which ``fits(x)`` holds (else ValueError
    "x must be <expect>"), of the model's dtype (which its device must run) and on its device."""
    check.tensor(x, "x", expect)
    if not fits(x):
        check.fail(ValueError, "x", expect, "shape %s" % (list(x.shape),))
    P = weight
    if P.dtype not in _DTYPES.get(P.device.type, (P.dtype,)):
        check.fail(TypeError, "the model's dtype", "one of %s on %s (convert it with model.to(...))"
                   % (", ".join(map(str, _DTYPES[P.device.type])), P.device.type), str(P.dtype))
    if x.dtype != P.dtype:
        other = ", or the model with model.to(%s)" % x.dtype if x.dtype.is_floating_point else ""
        check.fail(TypeError, "x", "of the model's dtype %s (cast it with x.to(%s)%s)" % (P.dtype, P.dtype, other),
                   str(x.dtype))
    if x.device != P.device:
        check.fail(ValueError, "x", "on the model's device %s" % P.device, str(x.device))
    return x


def _effective_depth(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError("effective_depth must be a real number Lt >= 0, got %r" % (value,))
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError("effective_depth must be a finite real number Lt >= 0, got %r" % (value,))
    return value


def _kinds(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _kinds(sub)


class SavedSettings:
    """State-dict loading for modules whose extra state holds settings (a mixin before nn.Module).

    Everything that would make a load fail is found before any tensor is copied in, so that a failed
    load leaves the module as it was: the saved extra state must be this class's (``_STATE_KEYS``)
    with valid values (:meth:`_parse_extra_state`) and the module's ``activation``; the settings
    named in ``_MUST_MATCH`` must equal the module's under strict loading (ValueError naming them),
    while ``load_state_dict(..., strict=False)`` adopts them with a warning; every tensor must have
    the module's shape; and a strict load must hold exactly the module's keys.
    """

    #: Settings a loaded state dict must agree on (strict loading), or that it replaces (strict=False).
    _MUST_MATCH = ()
    #: The keys of ``get_extra_state()`` that tell this class's state dicts from other modules'.
    _STATE_KEYS = ()
    #: What to do with the state dict of another SavedSettings class (said when one is loaded).
    _OTHER_KIND_HINT = ""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As ``nn.Module.load_state_dict``; ``strict=False`` also adopts other saved settings (see the class)."""
        if strict and isinstance(state_dict, Mapping):
            self._check_keys(state_dict)
        self._adopt_settings = not strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._adopt_settings

    def _check_keys(self, state_dict):
        mine = list(self.state_dict(keep_vars=True))
        missing = [k for k in mine if k not in state_dict]
        unexpected = [k for k in state_dict if k not in mine]
        if missing or unexpected:
            parts = (["missing key(s) %s" % ", ".join(map(repr, missing))] if missing else []) + \
                    (["unexpected key(s) %s" % ", ".join(map(repr, unexpected))] if unexpected else [])
            raise RuntimeError("Error(s) in loading state_dict for %s: %s (nothing was loaded; strict=False loads "
                               "the keys it has)" % (type(self).__name__, "; ".join(parts)))

    def _check_saved_kind(self, saved):
        if isinstance(saved, dict) and all(k in saved for k in self._STATE_KEYS):
            return
        kind = type(self).__name__
        other = next((c for c in _kinds(SavedSettings) if c is not type(self) and c._STATE_KEYS and isinstance(saved, dict)
                      and all(k in saved for k in c._STATE_KEYS)), None)
        if other is not None:
            got = "the state dict of a %s (%s)%s" % (other.__name__, ", ".join(
                "%s=%r" % (k, saved[k]) for k in other._STATE_KEYS), "; " + self._OTHER_KIND_HINT
                if self._OTHER_KIND_HINT else "")
        else:
            got = "one whose extra state is %s" % (repr(saved) if len(repr(saved)) <= 200 else repr(saved)[:200] + "...")
        check.fail(ValueError, "state_dict", "the state dict of a %s (its extra state has %s)"
                   % (kind, ", ".join(self._STATE_KEYS)), got)

    def _check_saved_activation(self, saved):
        activation = saved.get("activation", "relu")  # state dicts from before the option are relu
        if activation != self.activation:
            raise ValueError("the state dict was saved from a %s with activation=%r, this one has activation=%r; "
                             "build the model with activation=%r to load it"
                             % (type(self).__name__, activation, self.activation, activation))

    def _check_saved_settings(self, saved):
        """Every check of a saved extra state; returns the text of the settings strict=False adopts ("" if none)."""
        # torch passes strict=True to _load_from_state_dict whatever the caller asked; load_state_dict records it.
        self._check_saved_kind(saved)
        self._parse_extra_state(saved)
        self._check_saved_activation(saved)
        kind = type(self).__name__
        mine = self.get_extra_state()
        diff = [k for k in self._MUST_MATCH if k in saved and saved[k] != mine[k]]
        if not diff:
            return ""
        what = ", ".join("%s=%r (this model: %r)" % (k, saved[k], mine[k]) for k in diff)
        if not getattr(self, "_adopt_settings", False):
            check.fail(ValueError, "state_dict", "saved from a %s with this model's settings; build the model "
                       "with the saved ones, or load with strict=False to adopt them" % kind,
                       "one saved with %s" % what)
        return what

    def _mismatched_tensors(self, state_dict, prefix):
        """The load errors of this module's own tensors in ``state_dict`` (not a tensor, or another shape)."""
        errors = []
        own = list(self._parameters.items()) + [(k, v) for k, v in self._buffers.items()
                                                 if k not in self._non_persistent_buffers_set]
        for name, t in own:
            key = prefix + name
            if t is None or key not in state_dict:
                continue
            given = state_dict[key]
            if not torch.overrides.is_tensor_like(given):
                errors.append("%s: the state dict holds a %s, expected a tensor of shape %s"
                              % (key, type(given).__name__, list(t.shape)))
            elif given.shape != t.shape and not (t.dim() == 0 and tuple(given.shape) == (1,)):
                errors.append("size mismatch for %s: the state dict's has shape %s, this model's %s"
                              % (key, list(given.shape), list(t.shape)))
        return errors

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + _EXTRA_STATE_KEY_SUFFIX
        adopted = self._check_saved_settings(state_dict[key]) if key in state_dict else ""
        mismatched = self._mismatched_tensors(state_dict, prefix)
        if mismatched:  # torch raises them at the end; nothing of this module is copied in
            error_msgs.extend(mismatched + ["(nothing was loaded into the %s)" % type(self).__name__])
            return
        if adopted:
            warnings.warn("%s.load_state_dict(strict=False): adopting the saved %s" % (type(self).__name__, adopted),
                          stacklevel=5)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._loaded()


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
        self._effective_depth = _effective_depth(effective_depth)
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
        self._effective_depth = _effective_depth(value)
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
        d = self.in_features
        _check_input(x, self.proj_in, "[N, in_features] = [N, %d]" % d, lambda x: x.dim() >= 1 and x.shape[-1] == d)
        return x @ self.proj_in.transpose(0, 1)

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
        lam = _check_lam(lam)
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
    _STATE_KEYS = ("effective_depth", "steps")
    _OTHER_KIND_HINT = "a LeakyEnsemble's member(b) is a LeakyResNet"

    def _parse_extra_state(self, state):
        """The settings in a saved extra state, checked (ValueError / TypeError); nothing is changed."""
        if not isinstance(state, dict) or "effective_depth" not in state or "steps" not in state:
            check.fail(ValueError, "the state dict's LeakyResNet extra state", "a dict with 'effective_depth' and "
                       "'steps' (written by get_extra_state)", repr(state))
        return {"effective_depth": _effective_depth(state["effective_depth"]),
                "steps": _steps.check_scheme(state["steps"], STEP_SCHEMES, name="steps"),
                "a": _steps.check_irregularity(state.get("a", 0.0)),
                "init": _steps.check_scheme(state.get("init", self.init), INITS, name="init")}

    def set_extra_state(self, state):
        values = self._parse_extra_state(state)
        self._check_saved_activation(state)
        self._effective_depth, self.steps, self.a, self.init = (values[k] for k in ("effective_depth", "steps", "a",
                                                                                     "init"))

    def _loaded(self):
        _steps.warn_if_overshoot(self.rho, self._effective_depth, where="LeakyResNet.load_state_dict", stacklevel=6)

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
