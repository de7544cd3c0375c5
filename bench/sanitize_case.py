"""Small leaky-stack cases for compute-sanitizer (memcheck / racecheck / initcheck): every CUDA path once."""
import torch

import leakycuda  # noqa: F401  (loads the ops)

OPS = torch.ops.leakycuda


def run_case(dtype, w, N, L, return_all, checkpoint, tf32, B=None, activation="relu", inf_in_W=False):
    """One forward and backward; B models (with per-model Lt) when B is set; inf_in_W runs drho's <G, P> path."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator(device="cuda").manual_seed(0)
    lead = () if B is None else (B,)
    x0 = torch.randn(*lead, N, w, device="cuda", generator=g).to(dtype)
    W = (torch.randn(*lead, L, w, w + 1, device="cuda", generator=g) / w**0.5).to(dtype)
    rho = torch.full((*lead, L), 1.0 / L, device="cuda", dtype=dtype)
    if inf_in_W:
        W.view(-1, L, w, w + 1)[0, L - 1, 0, 1] = float("inf")
    model_Lt = None if B is None else torch.linspace(0.5, 3.0, B, dtype=torch.float64, device="cuda")
    Lt = 2.0
    out, states = OPS.leaky_stack(x0, W, rho, Lt, return_all, checkpoint, activation, model_Lt)
    grad = torch.randn_like(out)
    saved, k = (out, 1) if return_all else (states, checkpoint)
    dx0, dW, drho = OPS.leaky_stack_backward(grad, saved, W, rho, Lt, k, activation, model_Lt)
    torch.cuda.synchronize()
    if inf_in_W:
        assert not torch.isfinite(drho.float()).all()
        return
    assert torch.isfinite(dx0.float()).all() and torch.isfinite(dW.float()).all() and torch.isfinite(drho.float()).all()


def main():
    cases = [
        (torch.float32, 100, 37, 5, False, 2, True),
        (torch.float32, 100, 37, 5, True, 1, False),
        (torch.float64, 20, 17, 4, False, 3, False),
        (torch.bfloat16, 130, 70, 3, False, 1, False),
        (torch.float16, 250, 19, 3, True, 1, False),
        (torch.float32, 300, 21, 3, False, 2, True),
        (torch.float32, 100, 37, 5, False, 2, True, 3, "linear"),
        (torch.bfloat16, 60, 20, 4, True, 1, False, 2, "relu"),
        (torch.float64, 20, 17, 4, False, 3, False, 3, "linear"),
        (torch.float32, 300, 21, 3, False, 2, True, 2, "linear"),
        (torch.float32, 100, 37, 5, False, 1, True, 2, "relu", True),
        (torch.bfloat16, 300, 21, 3, False, 1, False, None, "relu", True),
    ]
    for c in cases:
        run_case(*c)
        print("ok", c, flush=True)


if __name__ == "__main__":
    main()
