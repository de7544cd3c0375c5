// The leakycuda op library: every op's schema, and the registration of every kernel of every op by one
// rule, plus an empty module init so that `import leakycuda._C` loads the registrations. The kernels
// live with their op family: checks and Meta kernels in generic/*_checks.cpp, device-generic code in
// generic/, CPU kernels in cpu/, CUDA entry points in cuda/ (declared in leaky_stack.h and energies.h).
//
// The rule: an op's schema is defined in TORCH_LIBRARY below, and its kernels are registered in the
// TORCH_LIBRARY_IMPL block of their dispatch key, from one of two lists:
//   - a device op has one kernel per device, <op>_cpu and <op>_cuda, and a Meta kernel <op>_meta (the
//     same argument checks on symbolic sizes, empty outputs) for FakeTensor and torch.compile;
//   - a device-generic op has one CompositeExplicitAutograd kernel <op>, built from ATen ops or from
//     other leakycuda ops through the dispatcher, which serves every device; where that kernel cannot
//     run under tracing (it needs concrete sizes), it has a Meta kernel <op>_meta too.
#include <torch/library.h>
#ifndef LEAKYCUDA_NO_PYTHON
#include <Python.h>
#endif

#include "energies.h"
#include "leaky_stack.h"

#ifndef LEAKYCUDA_NO_PYTHON
// `import leakycuda._C` loads this library and so runs the TORCH_LIBRARY registrations below;
// the module itself is empty (no pybind).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(leakycuda, m) {
  // Whole stack: x0 [N,w], W [L,w,w+1], rho [L] -> (out, states); activation "relu" or "linear"
  // (sigma(X) = [relu(X), 1] or [X, 1]). out is [L+1,N,w] (every X_l) when return_all, else [N,w]
  // (X_L); states holds what backward needs: X_0, X_k, X_2k, ... (k = checkpoint), [ceil(L/k),N,w],
  // or [0,N,w] when return_all. B models (a 4-D W): x0 [B,N,w], W [B,L,w,w+1], rho [B,L], every
  // output with a leading [B]; model_Lt None (every model uses Lt) or a float64 [B] of per-model Lt.
  m.def("leaky_stack(Tensor x0, Tensor W, Tensor rho, float Lt, bool return_all, int checkpoint,"
        " str activation=\"relu\", Tensor? model_Lt=None) -> (Tensor, Tensor)");
  // grad: [N,w] of X_L or [L+1,N,w] of every X_l; states: the forward's states (or its [L+1,N,w]
  // output with checkpoint 1). Returns (dx0 [N,w], dW [L,w,w+1], drho [L]); leading [B] for B models.
  m.def("leaky_stack_backward(Tensor grad, Tensor states, Tensor W, Tensor rho, float Lt,"
        " int checkpoint, str activation=\"relu\", Tensor? model_Lt=None) -> (Tensor, Tensor, Tensor)");
  // One layer: x [N,w], W [w,w+1], rho 0-d -> [N,w].
  m.def("leaky_layer(Tensor x, Tensor W, Tensor rho, float Lt, str activation=\"relu\") -> Tensor");
  m.def("leaky_layer_backward(Tensor grad, Tensor x, Tensor W, Tensor rho, float Lt,"
        " str activation=\"relu\") -> (Tensor, Tensor, Tensor)");

  // --- Cost of Identity, K-norms and energies (csrc/energies.h); S = sigma(X) = [act(X), 1] has
  // p = w+1 columns (bias) or p = w (bias=False), act = relu ("relu") or the identity ("linear");
  // gamma is [...] or one value > 0, or None for gamma0 * ||S||_op^2.
  // COI_gamma of X [..., N, w] -> (coi [...], gamma_used [...] f64, Z [..., p, w] f64).
  m.def("cost_of_identity(Tensor X, Tensor? gamma, float gamma0, bool bias, str activation=\"relu\")"
        " -> (Tensor, Tensor, Tensor)");
  // grad [...] of coi; Z, gamma: the forward's. Returns dX [..., N, w] (gamma held fixed).
  m.def("cost_of_identity_backward(Tensor grad, Tensor X, Tensor Z, Tensor gamma, bool bias,"
        " str activation=\"relu\") -> Tensor");
  // Exact COI ||S^+ X||_F^2 (cutoff rcond * sigma_max; None: max(N, p) * eps) -> (coi, residual
  // ||S S^+ X - X||_F, rank of S int64), each [...]; not differentiable.
  m.def("cost_of_identity_exact(Tensor X, float? rcond, bool bias, str activation=\"relu\")"
        " -> (Tensor, Tensor, Tensor)");
  // ||M||^2_{K(X),gamma} for M [..., N, m] -> (value [...], gamma_used [...] f64, Z [..., p, m] f64).
  m.def("k_norm2(Tensor M, Tensor X, Tensor? gamma, float gamma0, bool bias, str activation=\"relu\")"
        " -> (Tensor, Tensor, Tensor)");
  // Returns (dM, dX) (gamma held fixed).
  m.def("k_norm2_backward(Tensor grad, Tensor M, Tensor X, Tensor Z, Tensor gamma, bool bias,"
        " str activation=\"relu\") -> (Tensor, Tensor)");
  // xs [L+1, N, w], rho [L]; per layer l (metric from X_{l-1}) -> (coi, kinetic, potential,
  // hamiltonian, rank_estimate [L], gamma_used [L] f64, Z [L, p, 2w] f64 kept for backward).
  m.def("energies(Tensor xs, Tensor rho, float Lt, Tensor? gamma, float gamma0, bool bias,"
        " str activation=\"relu\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the five [L] outputs -> (dxs [L+1, N, w], drho [L]) (gamma held fixed).
  m.def("energies_backward(Tensor grad_coi, Tensor grad_kinetic, Tensor grad_potential,"
        " Tensor grad_hamiltonian, Tensor grad_rank, Tensor xs, Tensor rho, float Lt, Tensor Z,"
        " Tensor gamma, bool bias, str activation=\"relu\") -> (Tensor, Tensor)");
}

// X(op): the device ops, kernels <op>_cpu, <op>_cuda and <op>_meta.
#define LEAKYCUDA_DEVICE_OPS(X)                                                                        \
  X(leaky_stack) X(leaky_stack_backward) X(cost_of_identity) X(cost_of_identity_backward) X(k_norm2) \
  X(k_norm2_backward) X(energies) X(energies_backward)

// X(op): the device-generic ops, kernel <op>. leaky_layer runs as a one-layer leaky_stack (so traces
// through its Meta kernel); cost_of_identity_exact runs ATen's SVDs on concrete sizes.
#define LEAKYCUDA_GENERIC_OPS(X) X(leaky_layer) X(leaky_layer_backward) X(cost_of_identity_exact)
// X(op): the device-generic ops that cannot run under tracing, with a Meta kernel <op>_meta.
#define LEAKYCUDA_GENERIC_META_OPS(X) X(cost_of_identity_exact)

#define LEAKYCUDA_IMPL(op, suffix) m.impl(#op, &leakycuda::op##suffix);
#define LEAKYCUDA_CPU(op) LEAKYCUDA_IMPL(op, _cpu)
#define LEAKYCUDA_CUDA(op) LEAKYCUDA_IMPL(op, _cuda)
#define LEAKYCUDA_META(op) LEAKYCUDA_IMPL(op, _meta)
#define LEAKYCUDA_GENERIC(op) LEAKYCUDA_IMPL(op, )

TORCH_LIBRARY_IMPL(leakycuda, CPU, m) { LEAKYCUDA_DEVICE_OPS(LEAKYCUDA_CPU) }

#ifdef LEAKYCUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(leakycuda, CUDA, m) { LEAKYCUDA_DEVICE_OPS(LEAKYCUDA_CUDA) }
#endif

// Shapes under tracing (FakeTensor, torch.compile): the same checks as the kernels, no data.
TORCH_LIBRARY_IMPL(leakycuda, Meta, m) {
  LEAKYCUDA_DEVICE_OPS(LEAKYCUDA_META)
  LEAKYCUDA_GENERIC_META_OPS(LEAKYCUDA_META)
}

TORCH_LIBRARY_IMPL(leakycuda, CompositeExplicitAutograd, m) { LEAKYCUDA_GENERIC_OPS(LEAKYCUDA_GENERIC) }
