"""fit's training step (forward, backward, optimizer step), run eagerly or replayed from a captured CUDA graph."""
import warnings

import torch

__all__ = ["TrainStep", "use_cuda_graph"]

#: Eager steps run (on a side stream) before each capture: they initialise the optimizer's state
#: (Adam's moments, SGD's momentum buffers) and the libraries' per-stream handles. They are real
#: training steps, counted like any other.
WARMUP_STEPS = 2


def use_cuda_graph(flag, device, world_size=1):
    """Whether fit captures its step in a CUDA graph.

    flag None (the default): yes on a CUDA device in a single process, no otherwise; False: never;
    True: yes, and a ValueError where it cannot be done (a CPU model, or several processes: whole-step
    capture under DistributedDataParallel needs NCCL and DDP set up for it, which fit does not do).
    """
    if flag is None:
        return torch.device(device).type == "cuda" and world_size == 1
    if not isinstance(flag, bool):
        raise TypeError("cuda_graph must be None (on for CUDA models), True or False, got %r" % (flag,))
    if flag and torch.device(device).type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device, got one on %s; pass cuda_graph=None or "
                         "False" % (device,))
    if flag and world_size > 1:
        raise ValueError("cuda_graph=True is not supported with %d data-parallel processes; pass cuda_graph=None or "
                         "False" % world_size)
    return flag


class _CudaBackend:
    """The CUDA calls TrainStep makes (a separate object so the CPU tests can stand in a recording fake)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def eager(self, fn):
        """fn() on a side stream, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def capture(self, fn):
        """A CUDA graph of fn()'s kernels; fn's work is recorded, not run."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph


class TrainStep:
    """One optimizer step ``body(opt)`` (loss, backward, opt.step(); the grads are None when it starts).

    Eager (``graphed=False``): ``opt.zero_grad(set_to_none=True)`` then ``body(opt)`` on every call.

    Graphed: whole-step capture as in PyTorch's CUDA-graph notes. The first ``warmup`` calls after a
    change run ``body`` eagerly on a side stream; the next one captures it in a CUDA graph (with the
    grads set to None first, so backward allocates them in the graph's pool) and replays it; later
    calls only replay. Between replays, tensors read by the graph may be changed in place (rho after
    an adaptive update, a mask, the optimizer's state), never replaced. A change is re-captured:
    another optimizer object (the Adam -> SGD switch), another ``key`` (whatever the caller passes as
    a Python constant into ``body``, e.g. Lt or the phase), or another storage behind any tensor that
    ``watch()`` returns (parameters or buffers re-assigned by user code).

    The optimizer must be capturable (``torch.optim.Adam(..., capturable=True)``; SGD is). Nothing in
    ``body`` may synchronise with the host.
    """

    def __init__(self, body, *, graphed, device=None, watch=None, warmup=WARMUP_STEPS, backend=None):
        self.body = body
        self.graphed = bool(graphed)
        self.watch = watch
        self.warmup = warmup
        self.captures = 0
        self._backend = backend if backend is not None or not self.graphed else _CudaBackend(device)
        self._graph, self._opt, self._target, self._warm = None, None, None, 0

    def _eager(self, opt):
        opt.zero_grad(set_to_none=True)
        self.body(opt)

    def __call__(self, opt, key=()):
        if not self.graphed:
            self._eager(opt)
            return
        ptrs = tuple(t.data_ptr() for t in self.watch()) if self.watch is not None else ()
        target = (key, ptrs)
        if self._graph is not None and self._opt is opt and self._target == target:
            self._graph.replay()
            return
        if self._target != target or self._opt is not opt:
            self._graph, self._target, self._opt, self._warm = None, target, opt, 0
        if self._warm < self.warmup:
            with warnings.catch_warnings():
                # Adam(capturable=True) warns when it steps outside a capture, as the warm-up does by design.
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                self._backend.eager(lambda: self._eager(opt))
            self._warm += 1
            return
        opt.zero_grad(set_to_none=True)
        self._graph = self._backend.capture(lambda: self.body(opt))
        self.captures += 1
        self._graph.replay()
