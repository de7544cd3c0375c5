// The one list of leaky-stack template instances the CUDA launchers use (X-macros), and so of the compile
// units that build them: one unit per (storage type in LEAKY_STACK_TYPES, activation in
// LEAKY_STACK_ACTIVATIONS), generated at build time by csrc/gen_units.py. The launcher units
// (cuda/leaky_stack_unit.cuh) instantiate the launches of their type and activation, and so every kernel
// below of that storage type; the torch-free units (leaky_stack_unit_check.cuh) instantiate exactly those
// kernels, so CI compiles all device code with nvcc alone.
#pragma once

#include "leaky_stack_bwd.cuh"
#include "leaky_stack_dw.cuh"
#include "leaky_stack_fwd.cuh"
#include "leaky_stack_large.cuh"

namespace leakycuda {
namespace kernels {
using KindBF16 = KindHalf<__nv_bfloat16>;
using KindF16 = KindHalf<__half>;
}  // namespace kernels
}  // namespace leakycuda

// Width buckets of the small-width sweeps: w <= 64, <= 128, <= 256 (kBucket/32 warps per CTA).
// Tensor-core kinds: KindTF32 (float32, TF32 allowed), KindBF16, KindF16. Exact cores: float, double.
// Row tiles: kMT = 1 (16 rows per CTA) everywhere; kMT = 4 (64 rows) for large N, forward only,
// buckets 64 and 128 (at 256 the fp32 resident tile no longer fits beside the weight ring).
// Every sweep, dW and elementwise instance below exists once per activation of sigma:
// M(Act, args...) for each Act in LEAKY_STACK_ACTIVATIONS.
#define LEAKY_STACK_ACTIVATIONS(M, ...) M(Act::kRelu, __VA_ARGS__) M(Act::kLinear, __VA_ARGS__)

// X(Kind, kBucket, kMT): forward tensor-core sweeps (x activations).
#define LEAKY_STACK_MMA_FWD_INSTANCES(X)                                                        \
  X(KindTF32, 64, 1) X(KindTF32, 128, 1) X(KindTF32, 256, 1) X(KindTF32, 64, 4) X(KindTF32, 128, 4) \
  X(KindBF16, 64, 1) X(KindBF16, 128, 1) X(KindBF16, 256, 1) X(KindBF16, 64, 4) X(KindBF16, 128, 4) \
  X(KindF16, 64, 1) X(KindF16, 128, 1) X(KindF16, 256, 1) X(KindF16, 64, 4) X(KindF16, 128, 4)

// X(Kind, kBucket, kMT): backward tensor-core sweeps (x activations).
#define LEAKY_STACK_MMA_BWD_INSTANCES(X)                                  \
  X(KindTF32, 64, 1) X(KindTF32, 128, 1) X(KindTF32, 256, 1)               \
  X(KindBF16, 64, 1) X(KindBF16, 128, 1) X(KindBF16, 256, 1)               \
  X(KindF16, 64, 1) X(KindF16, 128, 1) X(KindF16, 256, 1)

// X(T, kBucket): exact sweeps, forward and backward (x activations).
#define LEAKY_STACK_FMA_INSTANCES(X) \
  X(float, 64) X(float, 128) X(float, 256) X(double, 64) X(double, 128) X(double, 256)

// X(T): the storage types (of x0, W and the outputs): those of the packing and drho kernels (no
// activation), and of the large-width elementwise kernels (x activations). One compile unit per type
// and activation.
#define LEAKY_STACK_TYPES(X) X(float) X(double) X(__nv_bfloat16) X(__half)

// X(T, TG): <G, P> fallback of drho, TG the type G is held in (the accumulation type in the small-width
// sweeps, T on the GEMM path), x activations.
#define LEAKY_STACK_FALLBACK_INSTANCES(X)                                                  \
  X(float, float) X(double, double) X(__nv_bfloat16, float) X(__half, float) \
  X(__nv_bfloat16, __nv_bfloat16) X(__half, __half)

// X(T, kMma): dW kernels (TF32 tensor cores for float with TF32 and for the half types; exact else),
// x activations.
#define LEAKY_STACK_DW_INSTANCES(X) \
  X(float, true) X(float, false) X(double, false) X(__nv_bfloat16, true) X(__half, true)
