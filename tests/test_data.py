"""Tests of leakycuda.data.bottleneck_task: shapes, normalisation, determinism, the teacher's Jacobian rank."""
import pytest
import torch

from leakycuda.data import bottleneck_task

F64 = torch.float64


@pytest.mark.parametrize("teacher,inner", [("fcnn", (3,)), ("resnet", (6, 3))])
def test_shapes_dtype_and_normalisation(teacher, inner):
    t = bottleneck_task(d=30, inner=inner, n_train=200, n_test=50, seed=1, teacher=teacher)
    assert t.x_train.shape == (200, 30) and t.y_train.shape == (200, 30)
    assert t.x_test.shape == (50, 30) and t.y_test.shape == (50, 30)
    assert all(v.dtype == torch.float32 for v in (t.x_train, t.y_train, t.x_test, t.y_test))
    assert t.rank == 3 and t.describe()["inner"] == list(inner)
    for v in (t.x_train, t.y_train):
        torch.testing.assert_close(v.double().mean(0), torch.zeros(30, dtype=F64), atol=1e-5, rtol=0)
        assert abs(float(v.double().square().sum(1).mean()) - 30.0) < 1e-3
    t64 = bottleneck_task(d=30, inner=inner, n_train=200, n_test=50, seed=1, teacher=teacher, dtype=F64)
    torch.testing.assert_close(t64.teacher(t64.x_train), t64.y_train)
    torch.testing.assert_close(t64.teacher(t64.x_test), t64.y_test)


def test_determinism_by_seed():
    a = bottleneck_task(n_train=64, n_test=16, seed=3)
    b = bottleneck_task(n_train=64, n_test=16, seed=3)
    c = bottleneck_task(n_train=64, n_test=16, seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    # The first n points do not depend on the test-set size only through the seed: same seed, same teacher.
    x = torch.randn(5, 30, dtype=F64)
    torch.testing.assert_close(a.teacher(x), b.teacher(x))


@pytest.mark.parametrize("teacher,inner,k", [("fcnn", (3,), 3), ("fcnn", (5,), 5), ("resnet", (6, 3), 3)])
def test_teacher_jacobian_has_the_inner_rank(teacher, inner, k):
    t = bottleneck_task(d=30, inner=inner, n_train=100, n_test=10, seed=0, teacher=teacher, dtype=F64)
    for i in range(4):
        J = torch.autograd.functional.jacobian(t.teacher, t.x_test[i:i + 1]).reshape(30, 30)
        s = torch.linalg.svdvals(J)
        assert float(s[k:].max()) < 1e-10 * float(s[0]), s[: k + 2]
        if teacher == "fcnn":  # generic points: exactly rank k (the ResNet's ReLU maps may fold one direction)
            assert float(s[k - 1]) > 1e-4 * float(s[0]), s[: k + 2]


def test_to_and_errors():
    t = bottleneck_task(n_train=10, n_test=4).to(dtype=F64)
    assert t.x_train.dtype == F64
    with pytest.raises(ValueError, match="teacher"):
        bottleneck_task(teacher="mlp")
    with pytest.raises(ValueError, match="inner"):
        bottleneck_task(inner=())
    with pytest.raises(ValueError, match="n_train"):
        bottleneck_task(n_train=1)
