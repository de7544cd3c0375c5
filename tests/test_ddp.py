"""Data-parallel fit: 2 gloo processes give the full-batch single-process parameters, and the same adaptive rho."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import free_port

F64 = torch.float64
FIT = dict(adam_steps=6, adam_lr=1e-2, sgd_steps=4, sgd_lr=1e-3, adapt_every=2, log_every=5)
WORLD = 2


def _setup(steps):
    from leakycuda.data import bottleneck_task
    from leakycuda.module import LeakyResNet

    # 37 points: the two shards have different sizes (19 and 18).
    task = bottleneck_task(d=6, inner=(2,), n_train=37, n_test=10, seed=0, hidden=16, dtype=F64)
    torch.manual_seed(0)
    return LeakyResNet(6, 6, 8, 5, 2.0, steps=steps, dtype=F64), task


def _worker(rank, port, steps, out):
    import torch.distributed as dist

    from leakycuda.train import fit

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=WORLD)
    try:
        model, task = _setup(steps)
        if rank == 1:  # DDP broadcasts rank 0's parameters at wrap time; start rank 1 elsewhere to see it.
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        result = fit(model, task, 1e-2, **FIT)
        torch.save({"state": model.state_dict(), "history": result.history}, out)
        # Both ranks done before either tears gloo down: a rank that destroys its group while the other still
        # talks to it can abort the other ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("steps", ["equidistant", "adaptive"])
def test_ddp_matches_full_batch(tmp_path, steps):
    from leakycuda.train import fit

    outs = [str(tmp_path / ("rank%d.pt" % r)) for r in range(WORLD)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(2):  # a second try on a fresh port, should another process take the first one
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), steps, outs[r]], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
        logs = [p.communicate(timeout=120)[0].decode() for p in procs]
        if all(p.returncode == 0 for p in procs) or not any("address already in use" in log.lower() for log in logs):
            break
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log

    model, task = _setup(steps)
    single = fit(model, task, 1e-2, **FIT)
    ranks = [torch.load(o, weights_only=True) for o in outs]
    for name, ref in model.state_dict().items():
        if not isinstance(ref, torch.Tensor):
            continue
        for r, got in enumerate(ranks):
            torch.testing.assert_close(got["state"][name], ref, rtol=1e-9, atol=1e-11, msg="%s on rank %d" % (name, r))
    # Every rank holds the same steps (the adaptive statistics are all-reduced, not broadcast).
    assert torch.equal(ranks[0]["state"]["rho"], ranks[1]["state"]["rho"])
    if steps == "adaptive":
        assert not torch.allclose(model.rho, torch.full_like(model.rho, 0.2))
    # The logged full-batch train loss is the same on every rank and matches the single process.
    for h0, h1, hs in zip(ranks[0]["history"], ranks[1]["history"], single.history):
        assert h0["train_mse"] == pytest.approx(hs["train_mse"], rel=1e-9)
        assert h1["train_mse"] == pytest.approx(hs["train_mse"], rel=1e-9)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
