"""Small leaky-stack cases for compute-sanitizer (memcheck / racecheck / initcheck): every CUDA path once."""
import torch

import leakycuda  # noqa: F401  (loads the ops)

OPS = torch.ops.leakycuda


def run_case(dtype, w, N, L, return_all, checkpoint, tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(N, w, device="cuda", generator=g).to(dtype)
    W = (torch.randn(L, w, w + 1, device="cuda", generator=g) / w**0.5).to(dtype)
    rho = torch.full((L,), 1.0 / L, device="cuda", dtype=dtype)
    Lt = 2.0
    out, states = OPS.leaky_stack(x0, W, rho, Lt, return_all, checkpoint)
    grad = torch.randn_like(out)
    saved, k = (out, 1) if return_all else (states, checkpoint)
    dx0, dW, drho = OPS.leaky_stack_backward(grad, saved, W, rho, Lt, k)
    torch.cuda.synchronize()
    assert torch.isfinite(dx0.float()).all() and torch.isfinite(dW.float()).all() and torch.isfinite(drho.float()).all()


def main():
    cases = [
        (torch.float32, 100, 37, 5, False, 2, True),
        (torch.float32, 100, 37, 5, True, 1, False),
        (torch.float64, 20, 17, 4, False, 3, False),
        (torch.bfloat16, 130, 70, 3, False, 1, False),
        (torch.float16, 250, 19, 3, True, 1, False),
        (torch.float32, 300, 21, 3, False, 2, True),
    ]
    for c in cases:
        run_case(*c)
        print("ok", c, flush=True)


if __name__ == "__main__":
    main()
