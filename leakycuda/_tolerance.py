"""How close to the float64 reference an op's result must be: the rule the tests and `leakycuda selftest` share.

float64 results: elementwise ``|got - want| <= rtol * |want| + rtol * (max|want| + 1)`` with rtol = 1e-10
(``torch.isclose``, as ``torch.testing.assert_close`` applies it).
Lower precision (float32, TF32, bfloat16, float16): ``max|got - want| <= 4 * e + 1e-6 * (max|want| + 1)``,
where e is the error the plain-PyTorch reference itself makes when run at the same precision on the same
inputs (its max abs difference from the float64 reference): a fused op may be a few times less exact
than eager PyTorch at its precision, never more. NaN anywhere fails both rules.
"""
import torch

#: Relative (and, times max|want| + 1, absolute) tolerance of float64 results.
FLOAT64_RTOL = 1e-10
#: How many times the same-precision reference's error a lower-precision result may make.
SAME_PRECISION_FACTOR = 4
#: Absolute floor of the lower-precision bound, times max|want| + 1 (a reference error of 0 allows this).
SAME_PRECISION_FLOOR = 1e-6


def _scale(want):
    return want.abs().max().item() + 1.0 if want.numel() else 1.0


def max_abs_error(got, want):
    """max |got - want| over every element (float64, on the CPU; 0 for empty tensors, NaN if any is NaN)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not want.numel():
        return 0.0
    d = (got - want).abs()
    return float("nan") if bool(d.isnan().any()) else d.max().item()


def worst_element(got, want, allowed):
    """(|got - want|, allowed) at the element where |got - want| / allowed is largest (NaN counts as largest;
    equal entries, infinities included, count as 0)."""
    d = (got - want).abs()
    ratio = torch.where(got == want, torch.zeros_like(d), d / allowed.clamp_min(1e-300))
    i = torch.argmax(torch.nan_to_num(ratio, nan=float("inf")).reshape(-1))
    return d.reshape(-1)[i].item(), allowed.reshape(-1)[i].item()


def compare(got, want, same_precision_error=None):
    """Applies the rule to one result; returns (ok, err, bound). Lower precision: err = max|got - want| and
    bound what the rule allows; float64 (same_precision_error None): the error and the elementwise bound at the
    element nearest its bound (so err <= bound exactly when ok, NaN aside)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return False, float("inf"), 0.0
    if not want.numel():
        return True, 0.0, 0.0
    scale = _scale(want)
    if same_precision_error is None:
        ok = bool(torch.isclose(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * scale).all())
        err, bound = worst_element(got, want, FLOAT64_RTOL * scale + FLOAT64_RTOL * want.abs())
        return ok, err, bound
    err = max_abs_error(got, want)
    bound = SAME_PRECISION_FACTOR * same_precision_error + SAME_PRECISION_FLOOR * scale
    return bool(err <= bound), err, bound


def assert_close_to_reference(got, want, same_precision_error=None, name=""):
    """AssertionError unless ``got`` is within the rule of the float64 reference ``want`` (see the module docstring)."""
    got, want = got.double().cpu(), want.double().cpu()
    if same_precision_error is None:
        torch.testing.assert_close(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * _scale(want), msg=name)
        return
    ok, err, bound = compare(got, want, same_precision_error)
    assert ok, (f"{name}: error {err:.3g} > bound {bound:.3g} ({SAME_PRECISION_FACTOR} x the same-precision "
                f"reference's error {same_precision_error:.3g})")


#: The precisions a stack runs in: name -> (dtype, TF32 matmuls allowed); tf32/bf16/fp16 on CUDA only.
PRECISIONS = {
    "fp64": (torch.float64, False),
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
}
