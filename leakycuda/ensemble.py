"""LeakyEnsemble: B Leaky ResNets held as one module, so that a sweep runs as one batched stack op per step."""
import contextlib
import numbers
import warnings

import torch
from torch import nn

from . import _validate as check
from . import steps as _steps
from .functional import leaky_stack
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from .module import INITS, STEP_SCHEMES, LeakyResNet, SavedSettings, check_effective_depth

__all__ = ["LeakyEnsemble"]

_STATE_VERSION = 1
# Per-member settings: the LeakyResNet constructor argument each one feeds.
_PER_MEMBER = ("depth", "effective_depth", "steps", "a", "init")


def _is_sequence(value):
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    return isinstance(value, (list, tuple))


def _as_list(value):
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _member_count(models, per_member):
    """B from ``models`` and the lengths of the per-member sequences (which must agree)."""
    lengths = {name: len(_as_list(v)) for name, v in per_member.items() if _is_sequence(v)}
    if models is not None:
        if isinstance(models, bool) or not isinstance(models, numbers.Integral) or models < 1:
            raise ValueError("models must be a positive integer B (the number of Leaky ResNets), got %r" % (models,))
        B = int(models)
    elif lengths:
        B = next(iter(lengths.values()))
    else:
        raise ValueError("give models=B, or at least one per-member sequence (depth, effective_depth, steps, a, "
                         "init or seeds), to say how many Leaky ResNets the ensemble holds")
    bad = {name: n for name, n in lengths.items() if n != B}
    if bad:
        raise ValueError("every per-member sequence must have B = %d entries (%s), got %s"
                         % (B, "models=%d" % B if models is not None else "the first sequence's length",
                            ", ".join("%s with %d" % kv for kv in bad.items())))
    return B


@contextlib.contextmanager
def _member_rng(device, seed):
    """Runs the body with the generator of ``device`` seeded with ``seed`` (restored afterwards);
    ``seed=None`` uses (and advances) the global generator, as a plain ``LeakyResNet(...)`` call would."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError("each seed must be None or an integer >= 0, got %r" % (seed,))
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        else:
            torch.random.default_generator.manual_seed(int(seed))
        yield


class LeakyEnsemble(SavedSettings, nn.Module):
    """B Leaky ResNets in one module: y[b] = LeakyResNet_b(x[b]) for b = 0..B-1, one batched stack op per call.

    Why its own class (and not ``LeakyResNet(..., models=B)``): a LeakyResNet's settings are single
    values (``Lt`` a float, ``steps`` a string, ``depth`` an int) that its methods, state dict,
    :func:`leakycuda.diagnostics.analyze` and user code read as such. Here every one of them is per
    member, members may differ in depth (padding), and the outputs gain a model dimension, so
    folding both into one class would give every LeakyResNet attribute two types. This class
    stores the B members stacked; :meth:`member` gives any one back as a plain LeakyResNet and
    :meth:`from_models` builds an ensemble from LeakyResNets.

    Args:
        in_features, out_features, width: shared by all members (d_in, d_out, w).
        depth, effective_depth, steps, a, init: as in :class:`~leakycuda.LeakyResNet`, each either one
            value for every member or a sequence of B values (one per member).
        learn_projections, checkpoint, activation, device, dtype: shared, as in LeakyResNet.
        models: B; may be left out when some per-member argument (or ``seeds``) is a sequence.
        seeds: None, or a sequence of B seeds (ints, or None entries). Member b is initialised
            exactly as ``LeakyResNet(...)`` with its settings right after ``torch.manual_seed(seeds[b])``
            (only the generator of ``device`` matters; it is restored afterwards), so an ensemble run
            and B sequential runs start from the same weights. Members without a seed draw from the
            global generator in order b = 0, 1, ..., as B successive LeakyResNet constructions would.

    Members of different depth: the stack holds L = max(depths) layers; member b's layers
    depth[b]..L-1 are padding with rho = 0 (a layer with rho_l = 0 is the identity, whatever its
    weight), zero weights, no regularization (rho_l weighs it) and zero gradients, and adaptive
    updates never touch them. :meth:`member` and the diagnostics see only the real layers.

    Attributes:
        weight: [B, L, w, w+1] Parameter; proj_in: [B, w, d_in]; proj_out: [B, d_out, w]
            (Parameters, or buffers when ``learn_projections=False``).
        rho: [B, L] buffer (0 on padded layers).
        models (B), depth (L, the padded depth), depths, effective_depths (alias Lts), steps, a,
        init, seeds: per-member tuples.
    """

    def __init__(self, in_features, out_features, width, depth, effective_depth, steps="equidistant",
                 learn_projections=True, *, models=None, a=0.0, init="random", seeds=None, checkpoint=None,
                 activation="relu", device=None, dtype=None):
        super().__init__()
        per_member = dict(depth=depth, effective_depth=effective_depth, steps=steps, a=a, init=init)
        if seeds is not None and not _is_sequence(seeds):
            raise TypeError("seeds must be None or a sequence of B seeds (one per member), got %r" % (seeds,))
        B = _member_count(models, dict(per_member, **({"seeds": seeds} if seeds is not None else {})))
        values = {k: _as_list(v) if _is_sequence(v) else [v] * B for k, v in per_member.items()}
        shared = dict(in_features=in_features, out_features=out_features, width=width,
                      learn_projections=learn_projections, checkpoint=checkpoint, activation=activation)
        configs = [dict(shared, **{k: values[k][b] for k in _PER_MEMBER}) for b in range(B)]
        seeds = _as_list(seeds) if seeds is not None else [None] * B
        self._adopt(self._build(configs, seeds, device, dtype), seeds)

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def _build(configs, seeds, device, dtype):
        """One LeakyResNet per config, each constructed under its seed (this also validates every argument)."""
        dev = torch.device(device) if device is not None else torch.empty(0).device
        members = []
        for b, (cfg, seed) in enumerate(zip(configs, seeds)):
            with _member_rng(dev, seed):
                try:
                    members.append(LeakyResNet(**cfg, device=device, dtype=dtype))
                except (TypeError, ValueError) as e:
                    raise type(e)("member %d: %s" % (b, e)) from None
        return members

    @classmethod
    def from_models(cls, models):
        """An ensemble holding copies of the LeakyResNets ``models`` (their weights, steps rho, Lt and settings).

        They must share in_features, out_features, width, learn_projections, checkpoint, activation,
        device and dtype; depths, Lt, step schemes and inits may differ.
        """
        models = list(models)
        if not models or not all(isinstance(m, LeakyResNet) for m in models):
            raise TypeError("from_models needs a non-empty sequence of LeakyResNet, got %s"
                            % ([type(m).__name__ for m in models] or "an empty one"))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(models, [None] * len(models))
        return self

    def _adopt(self, members, seeds):
        first = members[0]
        for name in ("in_features", "out_features", "width", "learn_projections", "checkpoint", "activation"):
            got = [getattr(m, name) for m in members]
            if any(g != got[0] for g in got):
                raise ValueError("the members of an ensemble must share %s, got %s" % (name, got))
        for name in ("device", "dtype"):
            got = [getattr(m.weight, name) for m in members]
            if any(g != got[0] for g in got):
                raise ValueError("the members of an ensemble must share the weights' %s, got %s" % (name, got))
        self.in_features, self.out_features, self.width = first.in_features, first.out_features, first.width
        self.learn_projections, self.checkpoint = first.learn_projections, first.checkpoint
        self.activation = first.activation
        self.depths = tuple(m.depth for m in members)
        self._Lts = [m.effective_depth for m in members]
        self.steps = tuple(m.steps for m in members)
        self.a = tuple(m.a for m in members)
        self.init = tuple(m.init for m in members)
        self.seeds = tuple(seeds)
        self._consts = {}
        B, L, w = len(members), max(self.depths), self.width
        kw = dict(device=first.weight.device, dtype=first.weight.dtype)
        self.weight = nn.Parameter(torch.zeros(B, L, w, w + 1, **kw))
        proj_in = torch.empty(B, w, self.in_features, **kw)
        proj_out = torch.empty(B, self.out_features, w, **kw)
        if self.learn_projections:
            self.proj_in, self.proj_out = nn.Parameter(proj_in), nn.Parameter(proj_out)
        else:
            self.register_buffer("proj_in", proj_in)
            self.register_buffer("proj_out", proj_out)
        self.register_buffer("rho", torch.zeros(B, L, **kw))
        self._copy_members(members)

    @torch.no_grad()
    def _copy_members(self, members):
        for b, m in enumerate(members):
            Lb = self.depths[b]
            self.weight[b].zero_()
            self.weight[b, :Lb].copy_(m.weight)
            self.proj_in[b].copy_(m.proj_in)
            self.proj_out[b].copy_(m.proj_out)
            self.rho[b].zero_()
            self.rho[b, :Lb].copy_(m.rho)

    def _member_config(self, b):
        return dict(in_features=self.in_features, out_features=self.out_features, width=self.width,
                    depth=self.depths[b], effective_depth=self._Lts[b], steps=self.steps[b],
                    learn_projections=self.learn_projections, a=self.a[b], init=self.init[b],
                    checkpoint=self.checkpoint, activation=self.activation)

    def reset_parameters(self, seeds=None):
        """Re-initialises every member as :class:`LeakyResNet` would (see ``seeds`` in the class docstring)."""
        if seeds is not None and (not _is_sequence(seeds) or len(_as_list(seeds)) != self.models):
            raise ValueError("seeds must be None or a sequence of B = %d seeds, got %r" % (self.models, seeds))
        seeds = _as_list(seeds) if seeds is not None else [None] * self.models
        self._copy_members(self._build([self._member_config(b) for b in range(self.models)], seeds,
                                       self.weight.device, self.weight.dtype))
        self.seeds = tuple(seeds)

    # -- members --------------------------------------------------------------------------------
    @property
    def models(self):
        """B, the number of members."""
        return self.weight.shape[0]

    @property
    def depth(self):
        """L, the depth of the padded stack (the largest member depth)."""
        return self.weight.shape[1]

    def _index(self, b):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not -self.models <= b < self.models:
            raise IndexError("member index must be an integer in [0, %d), got %r" % (self.models, b))
        return int(b) % self.models

    def member(self, b):
        """Member b as a plain :class:`~leakycuda.LeakyResNet` with its real layers only (a copy, not a view).

        Its weights, projections, rho and Lt equal the ensemble's; run
        :func:`leakycuda.diagnostics.analyze` on it for that member's diagnostics.
        """
        b = self._index(b)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rho is replaced below; the ensemble already warned about it
            net = LeakyResNet(**self._member_config(b), dtype=self.weight.dtype)
        net.to(self.weight.device)
        Lb = self.depths[b]
        with torch.no_grad():
            net.weight.copy_(self.weight[b, :Lb])
            net.proj_in.copy_(self.proj_in[b])
            net.proj_out.copy_(self.proj_out[b])
            net.rho.copy_(self.rho[b, :Lb])
        return net

    def members(self):
        """Every member as a LeakyResNet (see :meth:`member`)."""
        return [self.member(b) for b in range(self.models)]

    def layer_mask(self):
        """[B, L] bool: True on each member's real layers, False on padding."""
        L = self.depth
        depths = torch.tensor(self.depths, device=self.rho.device)
        return torch.arange(L, device=self.rho.device) < depths[:, None]

    # -- effective depth ------------------------------------------------------------------------
    @property
    def effective_depths(self):
        """The members' Lt, a tuple of B floats; assign a sequence of B values (or one value for all) to change them."""
        return tuple(self._Lts)

    @effective_depths.setter
    def effective_depths(self, values):
        values = _as_list(values) if _is_sequence(values) else [values] * self.models
        if len(values) != self.models:
            raise ValueError("effective_depths needs B = %d values, got %d" % (self.models, len(values)))
        checked = []
        for b, v in enumerate(values):
            try:
                checked.append(check_effective_depth(v))
            except (TypeError, ValueError) as e:
                raise type(e)("member %d: %s" % (b, e)) from None
        self._Lts = checked
        self._consts.clear()
        self._warn_overshoot("LeakyEnsemble.effective_depths")

    Lts = effective_depths

    def _warn_overshoot(self, where):
        for b in range(self.models):
            _steps.warn_if_overshoot(self.rho[b, :self.depths[b]], self._Lts[b], where="%s (member %d)" % (where, b),
                                     stacklevel=4)

    def _const(self, key, values):
        """A cached tensor of ``values`` on the weights' device (one host-to-device copy per value set:
        nothing is copied inside a CUDA-graph capture)."""
        t = self._consts.get(key)
        dev = self.weight.device
        if t is None or t.device != dev:
            t = torch.tensor(values, dtype=key[0], device=dev)
            self._consts[key] = t
        return t

    def _stack_Lt(self):
        """Lt for the batched op: a float when every member shares it, else a float64 [B] tensor."""
        if all(v == self._Lts[0] for v in self._Lts):
            return self._Lts[0]
        return self._const((torch.float64, "Lt", tuple(self._Lts)), self._Lts)

    # -- forward --------------------------------------------------------------------------------
    def _embed(self, x):
        B, d = self.models, self.in_features
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != d \
                or (x.dim() == 3 and x.shape[0] != B):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError("x must be [N, in_features] = [N, %d] (shared by every member) or [B, N, in_features] "
                             "= [%d, N, %d] (one batch per member), got %s" % (d, B, d, got))
        return x @ self.proj_in.transpose(-1, -2)

    def forward(self, x):
        """x: [N, d_in] (every member sees it) or [B, N, d_in] (member b sees x[b]) -> y: [B, N, d_out]."""
        X = leaky_stack(self._embed(x), self.weight, self.rho, self._stack_Lt(), checkpoint=self.checkpoint,
                        activation=self.activation)
        return X @ self.proj_out.transpose(-1, -2)

    def representations(self, x):
        """x as in :meth:`forward` -> X_0..X_L of every member: [B, L+1, N, w] (differentiable).

        Member b's real representations are [b, :depths[b]+1]; past them the padded layers repeat X_{depths[b]}.
        """
        return leaky_stack(self._embed(x), self.weight, self.rho, self._stack_Lt(), return_all=True,
                           activation=self.activation)

    def regularization(self, lam):
        """Per member lam_b/(2*Lt_b) * sum_l rho_l ||W_l||_F^2 (lam_b/2 * ... where Lt_b = 0): a [B] tensor.

        lam: one number, or a sequence of B (one per member). Padded layers add nothing (rho_l = 0).
        Sum it with the data costs for the training loss; rho is treated as a constant.
        """
        lams = _as_list(lam) if _is_sequence(lam) else [lam] * self.models
        if len(lams) != self.models:
            raise ValueError("lam must be one number or B = %d numbers, got %d" % (self.models, len(lams)))
        scale = [float(l) / 2.0 if Lt == 0.0 else float(l) / (2.0 * Lt) for l, Lt in zip(lams, self._Lts)]
        norms = self.weight.square().sum(dim=(2, 3))
        return (self.rho.detach() * norms).sum(dim=1) * self._const((self.weight.dtype, "reg", tuple(scale)), scale)

    def adapt_steps(self, x, *, members=None, reduce=None, eps=1e-8):
        """One adaptive update of rho for the members with ``steps="adaptive"``; returns the new rho [B, L] (a copy).

        x as in :meth:`forward`. ``members``: an optional iterable of member indices to update (the
        adaptive ones among them; default every adaptive member). Each member's update is
        :meth:`LeakyResNet.adapt_steps` on its real layers; padded layers keep rho = 0. ``reduce``
        (data parallelism) is applied once to the statistics of all updated members, concatenated.
        """
        chosen = range(self.models) if members is None else sorted({self._index(b) for b in members})
        chosen = [b for b in chosen if self.steps[b] == "adaptive"]
        if members is None and not chosen:
            raise RuntimeError("adapt_steps needs at least one member built with steps='adaptive', this ensemble "
                               "has steps=%r" % (self.steps,))
        if chosen:
            with torch.no_grad():
                xs = self.representations(x)
                stats = torch.cat([_steps.adaptive_statistics(xs[b, :self.depths[b] + 1]) for b in chosen], dim=1)
                if reduce is not None:
                    out = reduce(stats)
                    if isinstance(out, torch.Tensor):
                        stats = out
                start = 0
                for b in chosen:
                    Lb = self.depths[b]
                    self.rho[b, :Lb].copy_(_steps.steps_from_statistics(stats[:, start:start + Lb],
                                                                         self.rho[b, :Lb], eps=eps))
                    start += Lb
            for b in chosen:
                _steps.warn_if_overshoot(self.rho[b, :self.depths[b]], self._Lts[b],
                                         where="LeakyEnsemble.adapt_steps (member %d)" % b)
        return self.rho.clone()

    # -- state dict -----------------------------------------------------------------------------
    def get_extra_state(self):
        """The per-member settings as plain Python values (loadable with weights_only=True)."""
        return {"version": _STATE_VERSION, "depths": list(self.depths), "effective_depths": list(self._Lts),
                "steps": list(self.steps), "a": list(self.a), "init": list(self.init),
                "seeds": list(self.seeds), "activation": self.activation}

    #: As LeakyResNet: a strict load refuses other saved Lt, schemes or a; strict=False adopts them.
    _MUST_MATCH = ("effective_depths", "steps", "a")

    def set_extra_state(self, state):
        keys = ("depths", "effective_depths", "steps", "a", "init")
        B = self.models
        if not isinstance(state, dict) or any(not isinstance(state.get(k), list) or len(state[k]) != B for k in keys):
            check.fail(ValueError, "the state dict's LeakyEnsemble extra state", "a dict with lists of B = %d %s "
                       "(written by get_extra_state)" % (B, ", ".join(keys)), repr(state))
        self._check_saved_depths(state)
        self._check_saved_activation(state)
        configs = [dict(self._member_config(b), effective_depth=state["effective_depths"][b],
                        steps=state["steps"][b], a=state["a"][b], init=state["init"][b]) for b in range(B)]
        for b, cfg in enumerate(configs):  # validate before changing anything
            self._check_member_settings(b, cfg)
        self._Lts = [float(v) for v in state["effective_depths"]]
        self.steps, self.a, self.init = tuple(state["steps"]), tuple(state["a"]), tuple(state["init"])
        self.seeds = tuple(state.get("seeds", [None] * B))
        self._consts.clear()

    @staticmethod
    def _check_member_settings(b, cfg):
        try:
            check_effective_depth(cfg["effective_depth"])
            _steps.check_scheme(cfg["steps"], STEP_SCHEMES, name="steps")
            _steps.check_irregularity(cfg["a"])
            _steps.check_scheme(cfg["init"], INITS, name="init")
        except (TypeError, ValueError) as e:
            raise ValueError("member %d of the loaded state: %s" % (b, e)) from None

    def _check_saved_depths(self, state):
        if not isinstance(state.get("depths"), list) or tuple(state["depths"]) != self.depths:
            raise ValueError("the state dict was saved from a LeakyEnsemble with depths %s, this one has depths %s"
                             % (state.get("depths"), list(self.depths)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + _EXTRA_STATE_KEY_SUFFIX)
        if isinstance(saved, dict):  # refuse before any tensor is copied in
            self._check_saved_depths(saved)
            self._check_saved_settings(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._warn_overshoot("LeakyEnsemble.load_state_dict")

    def extra_repr(self):
        def short(values):
            return repr(values[0]) if all(v == values[0] for v in values) else repr(list(values))

        s = ("models={}, in_features={}, out_features={}, width={}, depths={}, effective_depths={}, steps={}"
             .format(self.models, self.in_features, self.out_features, self.width, short(self.depths),
                     short(tuple(self._Lts)), short(self.steps)))
        if any(s_ == "irregular" for s_ in self.steps):
            s += ", a={}".format(short(self.a))
        s += ", learn_projections={}, init={}, activation={!r}".format(self.learn_projections, short(self.init),
                                                                      self.activation)
        if self.checkpoint is not None:
            s += ", checkpoint={!r}".format(self.checkpoint)
        return s
