"""Synthetic teacher tasks with a known bottleneck rank k* (the paper's Figures 1 and 2)."""
import dataclasses
import math
import numbers

import torch

from . import _validate as check

__all__ = ["BottleneckTask", "bottleneck_task"]

TEACHERS = ("fcnn", "resnet")


def _random_fcnn(a, b, hidden, gen):
    """Weights of a random ReLU net R^a -> R^b with the given hidden widths (He-scaled, random biases)."""
    dims = (a,) + tuple(hidden) + (b,)
    layers = []
    for i in range(len(dims) - 1):
        fan_in, fan_out = dims[i], dims[i + 1]
        gain = 2.0 if i > 0 else 1.0  # the first layer sees a linear (non-rectified) input
        A = torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) * math.sqrt(gain / fan_in)
        c = torch.randn(fan_out, generator=gen, dtype=torch.float64) * (0.5 if i < len(dims) - 2 else 0.0)
        layers.append((A, c))
    return ("fcnn", layers)


def _random_resnet(a, b, hidden, blocks, gen):
    """Weights of a random ResNet R^a -> R^b: a linear map to R^b, then residual ReLU blocks in R^b."""
    P = torch.randn(b, a, generator=gen, dtype=torch.float64) / math.sqrt(a)
    res = []
    for _ in range(blocks):
        A = torch.randn(hidden, b, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / b)
        c = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.5
        B = torch.randn(b, hidden, generator=gen, dtype=torch.float64) * math.sqrt(1.0 / hidden)
        res.append((A, c, B))
    return ("resnet", (P, res))


def _apply(net, z):
    kind, params = net
    if kind == "fcnn":
        for i, (A, c) in enumerate(params):
            z = z @ A.to(z).T + c.to(z)
            if i < len(params) - 1:
                z = torch.relu(z)
        return z
    P, res = params
    z = z @ P.to(z).T
    for A, c, B in res:
        z = z + torch.relu(z @ A.to(z).T + c.to(z)) @ B.to(z).T / math.sqrt(len(res))
    return z


@dataclasses.dataclass
class BottleneckTask:
    """A regression task y = f*(x) whose teacher f* factors through R^k* (k* = min(inner)).

    Tensors (rows are samples): x_train [n_train, d], y_train [n_train, d], x_test [n_test, d],
    y_test [n_test, d]. ``rank`` is k*. ``teacher(x)`` maps normalised inputs to normalised outputs
    (the map the data were drawn from), differentiable, in x's dtype and device.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    d: int
    inner: tuple
    seed: int
    teacher_kind: str
    _nets: list = dataclasses.field(repr=False, default_factory=list)
    _norm: tuple = dataclasses.field(repr=False, default=())

    @property
    def rank(self):
        """k*, the bottleneck rank of the teacher: the smallest inner dimension."""
        return min(self.inner)

    def teacher(self, x):
        """f*(x) for normalised inputs x [N, d] (a floating tensor) -> normalised outputs [N, d]."""
        check.matrix(x, "x", None, self.d, cols_name="d")
        check.float_dtype(x.dtype, "x's dtype")
        mx, sx, my, sy = (t.to(x) for t in self._norm)
        z = x * sx + mx
        for net in self._nets:
            z = _apply(net, z)
        return (z - my) / sy

    def to(self, device=None, dtype=None):
        """A copy with the four data tensors moved/cast to a floating dtype (the teacher stays float64 internally)."""
        device = check.device(device)
        if dtype is not None:
            check.float_dtype(dtype)
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return dataclasses.replace(self, x_train=move(self.x_train), y_train=move(self.y_train),
                                   x_test=move(self.x_test), y_test=move(self.y_test))

    def describe(self):
        """A plain dict of what the task is (for JSON)."""
        return {"d": self.d, "inner": list(self.inner), "rank": self.rank, "seed": self.seed,
                "teacher": self.teacher_kind, "n_train": int(self.x_train.shape[0]),
                "n_test": int(self.x_test.shape[0])}


def bottleneck_task(d=30, inner=(3,), n_train=1000, n_test=1000, seed=0, teacher="fcnn", *,
                    hidden=100, hidden_layers=1, blocks=2, dtype=torch.float32, device=None):
    """A seeded synthetic task whose teacher has a known bottleneck rank k* = min(inner).

    The teacher is a composition of random networks through the dimensions d -> inner[0] -> ...
    -> inner[-1] -> d (the paper's Fig. 1: ``inner=(3,)``, d = 30; Fig. 2: ``inner=(6, 3)``,
    ``teacher="resnet"``):

    - ``teacher="fcnn"``: each map R^a -> R^b is a random ReLU net with ``hidden_layers`` hidden
      layers of width ``hidden`` (He-scaled Gaussian weights, N(0, 0.25) biases, linear output);
    - ``teacher="resnet"``: each map is a random ResNet: a Gaussian linear map R^a -> R^b followed
      by ``blocks`` residual blocks z + relu(z A^T + c) B^T / sqrt(blocks) of hidden width ``hidden``.

    Inputs x ~ N(0, I_d) (n_train + n_test points), outputs y = teacher(x). Both inputs and outputs
    are demeaned with the training mean and scaled by one number each so that the training points
    have mean squared norm d (unit variance per coordinate on average); test points get the same
    affine maps. The Jacobian of the (normalised) teacher has rank k* almost everywhere.

    Everything is drawn from a ``torch.Generator`` seeded with ``seed`` on the CPU in float64, so
    a seed gives the same task on every machine; the data are then cast to ``dtype`` (a floating
    dtype) on ``device``. The narrowest inner dimension k* must not exceed d (a bottleneck wider than
    the data is none). Returns a :class:`BottleneckTask`.
    """
    d = check.integer(d, "d", low=1, what="the input and output dimension")
    if isinstance(inner, numbers.Integral) and not isinstance(inner, bool):
        inner = (inner,)
    if isinstance(inner, (str, bytes)) or not hasattr(inner, "__iter__"):
        check.fail(TypeError, "inner", "a sequence of inner dimensions such as (3,) or (6, 3)", repr(inner))
    inner = tuple(inner)
    if not inner:
        check.fail(ValueError, "inner", "a non-empty sequence of inner dimensions, e.g. (3,)", "()")
    inner = tuple(check.integer(k, "each inner dimension", low=1) for k in inner)
    if min(inner) > d:
        check.fail(ValueError, "inner", "a bottleneck no wider than d = %d (k* = min(inner) <= d)" % d,
                   "%r, whose narrowest layer %d is wider than the data" % (inner, min(inner)))
    n_train = check.integer(n_train, "n_train", low=2, what="training points")
    n_test = check.integer(n_test, "n_test", low=0, what="test points")
    seed = check.integer(seed, "seed", low=0)
    hidden = check.integer(hidden, "hidden", low=1)
    blocks = check.integer(blocks, "blocks", low=1)
    hidden_layers = check.integer(hidden_layers, "hidden_layers", low=1)
    check.choice(teacher, "teacher", TEACHERS)
    dtype = check.float_dtype(dtype)
    device = check.device(device)

    gen = torch.Generator().manual_seed(seed)
    dims = (d,) + inner + (d,)
    nets = []
    for a, b in zip(dims[:-1], dims[1:]):
        if teacher == "fcnn":
            nets.append(_random_fcnn(a, b, (hidden,) * hidden_layers, gen))
        else:
            nets.append(_random_resnet(a, b, hidden, blocks, gen))
    x = torch.randn(n_train + n_test, d, generator=gen, dtype=torch.float64)
    z = x
    for net in nets:
        z = _apply(net, z)

    def affine(t):
        mean = t[:n_train].mean(dim=0)
        scale = ((t[:n_train] - mean).square().sum(dim=1).mean() / d).sqrt().clamp_min(1e-12)
        return mean, scale

    mx, sx = affine(x)
    my, sy = affine(z)
    xn, yn = (x - mx) / sx, (z - my) / sy
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return BottleneckTask(x_train=cast(xn[:n_train]), y_train=cast(yn[:n_train]), x_test=cast(xn[n_train:]),
                          y_test=cast(yn[n_train:]), d=d, inner=inner, seed=seed, teacher_kind=teacher,
                          _nets=nets, _norm=(mx, sx, my, sy))
