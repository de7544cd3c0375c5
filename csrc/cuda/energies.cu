// CUDA entry points of the COI / K-norm / energies ops: the fused kernels (csrc/kernels/energies.cuh)
// where they apply, else the device-generic implementation (csrc/generic/energies_aten.cpp).
//
// Forward: the Gram kernel (one pass over every X_l), then the small-solve kernel (gamma, inverse, Z,
// values; p <= kernels::kSolveMaxP and within the device's shared memory) or, for wider p, ATen's
// batched solves on the fused Grams. An entry the fused path cannot settle exactly as the CPU kernel does
// (non-finite input, uncertified lambda_max, a failed pivot, a value lost to cancellation) sends the
// whole call to the generic path, after one host read of the flags. Backward: one fused pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>
#include <vector>

#include "../energies.h"
#include "../kernels/energies.cuh"
#include "device_utils.h"

namespace leakycuda {
namespace {

namespace k = kernels;
using at::Tensor;

using cuda_util::allow_smem;
int smem_optin(int dev) { return cuda_util::device_info(dev).smem_optin; }

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// The fused forward needs the Gram form (N >= p); the backward's columns must fit its register tiles.
bool forward_fits(const KNormDims& d) { return d.B > 0 && d.N >= d.p; }
int backward_row_tiles(const KNormDims& d) {
  const int cols = std::max(k::pad8(int(d.m)), k::pad8(int(d.w)));
  for (int rt : {4, 2, 1})
    if (cols <= k::bwd_max_cols(rt)) return rt;
  return 0;
}
bool backward_fits(const KNormDims& d) { return d.B > 0 && d.N > 0 && backward_row_tiles(d) > 0; }

template <typename T>
k::EnergyOperands<T> operands(k::EnergySource src, const Tensor& X, const Tensor& M, const KNormDims& d, int blocks,
                              bool bias) {
  return {X.data_ptr<T>(), M.defined() ? M.data_ptr<T>() : nullptr, d.N, int(d.w), int(d.p), int(d.m), blocks, bias,
          src};
}

// Raw values [B, blocks] (||M_k||^2 where gamma = 0), gamma [B] and Z [B, p, m * blocks], all float64;
// ok = false when the call must go to the generic path.
struct Forward {
  Tensor values, gamma, Z;
  bool ok;
};

template <typename T>
Forward fused_forward(k::EnergySource src, const Tensor& X, const Tensor& M, const Tensor& rho, const KNormDims& d,
                      int blocks, bool bias, const c10::optional<Tensor>& gamma, double gamma0) {
  const auto f64 = X.options().dtype(at::kDouble);
  const int dev = X.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int p = int(d.p), m = int(d.m), mc = m * blocks, ld = p + mc;
  const int row_blocks = ceil_div(p, k::kGramRows), col_blocks = ceil_div(ld, k::kGramCols);
  Tensor Tg = at::empty({d.B, p, ld}, f64), norms = at::empty({d.B, col_blocks, 2}, f64);
  const k::GramParams<T> gp{operands<T>(src, X, M, d, blocks, bias), d.B, ld, row_blocks, col_blocks,
                            Tg.data_ptr<double>(), norms.data_ptr<double>()};
  const auto gram = d.relu ? k::energies_gram_kernel<T, true> : k::energies_gram_kernel<T, false>;
  allow_smem(reinterpret_cast<const void*>(gram), k::gram_smem_bytes(), dev);
  gram<<<unsigned(d.B * row_blocks * col_blocks), k::kThreads, k::gram_smem_bytes(), stream>>>(gp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const Tensor given = gamma.has_value() ? given_gamma(*gamma, d.B, X.device()) : Tensor();
  if (k::solve_smem_bytes(p) <= smem_optin(dev)) {
    Forward f{at::empty({d.B, blocks}, f64), at::empty({d.B}, f64), at::empty({d.B, p, mc}, f64), true};
    Tensor flags = at::empty({d.B}, X.options().dtype(at::kInt));
    const k::SolveParams sp{Tg.data_ptr<double>(), norms.data_ptr<double>(),
                            rho.defined() ? rho.data_ptr<double>() : nullptr,
                            given.defined() ? given.data_ptr<double>() : nullptr, gamma0, d.B, p, m, blocks, ld,
                            col_blocks, f.gamma.data_ptr<double>(), f.Z.data_ptr<double>(),
                            f.values.data_ptr<double>(), flags.data_ptr<int>()};
    const auto solve = d.relu ? k::energies_solve_kernel<true> : k::energies_solve_kernel<false>;
    allow_smem(reinterpret_cast<const void*>(solve), k::solve_smem_bytes(p), dev);
    solve<<<unsigned(d.B), k::kThreads, k::solve_smem_bytes(p), stream>>>(sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    f.ok = !flags.ne(0).any().item<bool>();
    return f;
  }
  // Wide p: ATen's batched solves on the fused Grams (the Gram kernel wrote the lower triangle of S^T S).
  Tensor A = Tg.narrow(2, 0, p);
  A = at::tril(A) + at::tril(A, -1).transpose(1, 2);
  if (!at::isfinite(A).all().item<bool>()) return {Tensor(), Tensor(), Tensor(), false};
  Tensor R = Tg.narrow(2, p, mc).clone();
  Tensor nrm = norms.sum(1).narrow(1, 0, blocks).clone();
  if (blocks == 2) {
    R.narrow(2, m, m).div_(rho.view({d.B, 1, 1}));
    nrm.select(1, 1).div_(rho.square());
  }
  const Tensor gam = given.defined() ? given : gamma_policy(A, gamma0);
  const Tensor dead = gam.eq(0.0);
  A.diagonal(0, 1, 2).add_(gam.unsqueeze(1));
  A = at::where(dead.view({d.B, 1, 1}), at::eye(p, f64), A);
  const Tensor Z = at::where(dead.view({d.B, 1, 1}), at::zeros({}, f64), solve_spd(A, R, gam));
  const Tensor diff = nrm - (R * Z).view({d.B, p, blocks, m}).sum({1, 3});
  const bool lost = (diff < nrm * k::kCancelTol).logical_and(dead.logical_not().unsqueeze(1)).any().item<bool>();
  return {at::where(dead.unsqueeze(1), nrm, diff / gam.unsqueeze(1)), gam, Z, !lost};
}

template <typename T, bool kRelu>
void launch_backward(const k::BwdParams<T>& bp, int rt, int dev, cudaStream_t stream, unsigned grid, int smem) {
  const auto kernel = rt == 4 ? k::energies_bwd_kernel<T, kRelu, 4>
                      : rt == 2 ? k::energies_bwd_kernel<T, kRelu, 2> : k::energies_bwd_kernel<T, kRelu, 1>;
  allow_smem(reinterpret_cast<const void*>(kernel), smem, dev);
  kernel<<<grid, k::kThreads, smem, stream>>>(bp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fused backward of one problem: writes dX (and dM, dnext, drho partials when given).
template <typename T>
void fused_backward(k::EnergySource src, const Tensor& X, const Tensor& M, const Tensor& rho, const KNormDims& d,
                    int blocks, int nblocks, bool bias, const Tensor& Z, const Tensor& gamma, const Tensor& coef,
                    Tensor& dX, Tensor& dM, Tensor& dnext, Tensor& drho) {
  const int rt = backward_row_tiles(d), chunks = ceil_div(d.N, 8 * rt), dev = X.get_device();
  const k::BwdParams<T> bp{operands<T>(src, X, M, d, blocks, bias), Z.data_ptr<double>(), gamma.data_ptr<double>(),
                           coef.data_ptr<double>(), rho.defined() ? rho.data_ptr<double>() : nullptr, d.B,
                           nblocks, chunks, dX.data_ptr<T>(), dM.defined() ? dM.data_ptr<T>() : nullptr,
                           dnext.defined() ? dnext.data_ptr<T>() : nullptr,
                           drho.defined() ? drho.data_ptr<double>() : nullptr};
  const int smem = k::bwd_smem_bytes(rt, int(d.p), int(d.m));
  const unsigned grid = unsigned(d.B * chunks);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (d.relu)
    launch_backward<T, true>(bp, rt, dev, stream, grid, smem);
  else
    launch_backward<T, false>(bp, rt, dev, stream, grid, smem);
}

std::vector<int64_t> batch_shape(const Tensor& X, std::initializer_list<int64_t> tail = {}) {
  std::vector<int64_t> s(X.sizes().begin(), X.sizes().end() - 2);
  s.insert(s.end(), tail);
  return s;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cost_of_identity_cuda(const Tensor& X, const c10::optional<Tensor>& gamma,
                                                         double gamma0, bool bias, c10::string_view activation) {
  const KNormDims d = check_coi_args(X, gamma, gamma0, bias, activation);
  c10::cuda::CUDAGuard device_guard(X.device());
  if (!cuda_aten_energies() && forward_fits(d)) {
    RECORD_FUNCTION("leakycuda::fused::cost_of_identity", std::vector<c10::IValue>());
    const Tensor Xc = X.contiguous();
    Forward f;
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "cost_of_identity_cuda", [&] {
      f = fused_forward<scalar_t>(k::EnergySource::kCoi, Xc, Tensor(), Tensor(), d, 1, bias, gamma, gamma0);
    });
    if (f.ok) {
      return {finish_knorm_values(f.values, f.gamma).select(1, 0).to(X.scalar_type()).reshape(batch_shape(X)),
              f.gamma.reshape(batch_shape(X)), f.Z.reshape(batch_shape(X, {d.p, d.w}))};
    }
  }
  return cost_of_identity_aten(X, gamma, gamma0, bias, activation);
}

Tensor cost_of_identity_backward_cuda(const Tensor& grad, const Tensor& X, const Tensor& Z, const Tensor& gamma,
                                      bool bias, c10::string_view activation) {
  const KNormDims d = check_coi_backward_args(grad, X, Z, gamma, bias, activation);
  if (cuda_aten_energies() || !backward_fits(d)) return cost_of_identity_backward_aten(grad, X, Z, gamma, bias, activation);
  RECORD_FUNCTION("leakycuda::fused::cost_of_identity_backward", std::vector<c10::IValue>());
  c10::cuda::CUDAGuard device_guard(X.device());
  const Tensor Xc = X.contiguous(), Zc = Z.contiguous(), g = gamma.contiguous();
  const Tensor coef = grad.detach().to(at::kDouble).reshape({d.B, 1}).contiguous();
  Tensor dX = at::empty(X.sizes(), Xc.options()), none;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "cost_of_identity_backward_cuda", [&] {
    fused_backward<scalar_t>(k::EnergySource::kCoi, Xc, Tensor(), Tensor(), d, 1, 1, bias, Zc, g, coef, dX, none,
                             none, none);
  });
  return dX;
}

std::tuple<Tensor, Tensor, Tensor> k_norm2_cuda(const Tensor& M, const Tensor& X, const c10::optional<Tensor>& gamma,
                                                double gamma0, bool bias, c10::string_view activation) {
  const KNormDims d = check_knorm_args(M, X, gamma, gamma0, bias, activation);
  c10::cuda::CUDAGuard device_guard(X.device());
  if (!cuda_aten_energies() && forward_fits(d)) {
    RECORD_FUNCTION("leakycuda::fused::k_norm2", std::vector<c10::IValue>());
    const Tensor Xc = X.contiguous(), Mc = M.contiguous();
    Forward f;
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "k_norm2_cuda", [&] {
      f = fused_forward<scalar_t>(k::EnergySource::kKNorm, Xc, Mc, Tensor(), d, 1, bias, gamma, gamma0);
    });
    if (f.ok) {
      return {finish_knorm_values(f.values, f.gamma).select(1, 0).to(X.scalar_type()).reshape(batch_shape(X)),
              f.gamma.reshape(batch_shape(X)), f.Z.reshape(batch_shape(X, {d.p, d.m}))};
    }
  }
  return k_norm2_aten(M, X, gamma, gamma0, bias, activation);
}

std::tuple<Tensor, Tensor> k_norm2_backward_cuda(const Tensor& grad, const Tensor& M, const Tensor& X, const Tensor& Z,
                                                 const Tensor& gamma, bool bias, c10::string_view activation) {
  const KNormDims d = check_knorm_backward_args(grad, M, X, Z, gamma, bias, activation);
  if (cuda_aten_energies() || !backward_fits(d)) return k_norm2_backward_aten(grad, M, X, Z, gamma, bias, activation);
  RECORD_FUNCTION("leakycuda::fused::k_norm2_backward", std::vector<c10::IValue>());
  c10::cuda::CUDAGuard device_guard(X.device());
  const Tensor Xc = X.contiguous(), Mc = M.contiguous(), Zc = Z.contiguous(), g = gamma.contiguous();
  const Tensor coef = grad.detach().to(at::kDouble).reshape({d.B, 1}).contiguous();
  Tensor dX = at::empty(X.sizes(), Xc.options()), dM = at::empty(M.sizes(), Mc.options()), none;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "k_norm2_backward_cuda", [&] {
    fused_backward<scalar_t>(k::EnergySource::kKNorm, Xc, Mc, Tensor(), d, 1, 1, bias, Zc, g, coef, dX, dM, none,
                             none);
  });
  return {dM, dX};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> energies_cuda(
    const Tensor& xs, const Tensor& rho, double Lt, const c10::optional<Tensor>& gamma, double gamma0, bool bias,
    c10::string_view activation) {
  const KNormDims d = check_energies_args(xs, rho, Lt, gamma, gamma0, bias, activation);
  c10::cuda::CUDAGuard device_guard(xs.device());
  if (!cuda_aten_energies() && forward_fits(d)) {
    RECORD_FUNCTION("leakycuda::fused::energies", std::vector<c10::IValue>());
    const Tensor xc = xs.contiguous(), r = rho.detach().to(at::kDouble).contiguous();
    Forward f;
    AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "energies_cuda", [&] {
      f = fused_forward<scalar_t>(k::EnergySource::kEnergies, xc, Tensor(), r, d, 2, bias, gamma, gamma0);
    });
    if (f.ok) {
      const auto e = energies_from_values(f.values, f.gamma, Lt);
      const auto dt = xs.scalar_type();
      return {e[0].to(dt), e[1].to(dt), e[2].to(dt), e[3].to(dt), e[4].to(dt), f.gamma, f.Z};
    }
  }
  return energies_aten(xs, rho, Lt, gamma, gamma0, bias, activation);
}

std::tuple<Tensor, Tensor> energies_backward_cuda(const Tensor& grad_coi, const Tensor& grad_kinetic,
                                                  const Tensor& grad_potential, const Tensor& grad_hamiltonian,
                                                  const Tensor& grad_rank, const Tensor& xs, const Tensor& rho,
                                                  double Lt, const Tensor& Z, const Tensor& gamma, bool bias,
                                                  c10::string_view activation) {
  const std::array<Tensor, 5> grads = {grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank};
  const KNormDims d = check_energies_backward_args(grads, xs, rho, Lt, Z, gamma, bias, activation);
  if (cuda_aten_energies() || !backward_fits(d)) {
    return energies_backward_aten(grad_coi, grad_kinetic, grad_potential, grad_hamiltonian, grad_rank, xs, rho, Lt,
                                  Z, gamma, bias, activation);
  }
  RECORD_FUNCTION("leakycuda::fused::energies_backward", std::vector<c10::IValue>());
  c10::cuda::CUDAGuard device_guard(xs.device());
  const int64_t L = d.B;
  const Tensor xc = xs.contiguous(), r = rho.detach().to(at::kDouble).contiguous(), Zc = Z.contiguous();
  const Tensor g = gamma.contiguous(), coef = energies_coef(grads, Lt).contiguous();
  // Block 1 (the kinetic part) may be skipped only where it provably adds exactly 0: every coefficient
  // of ||D_l||^2_K is 0 and nothing it would multiply is NaN or inf (0 * NaN is NaN in the reference).
  const auto [xmin, xmax] = at::aminmax(xc);
  const auto [zmin, zmax] = at::aminmax(Zc.narrow(2, d.m, d.m));
  const bool skip = coef.select(1, 1).eq(0.0).all().logical_and(at::isfinite(at::stack({xmin, xmax}).to(at::kDouble)).all())
                        .logical_and(at::isfinite(at::stack({zmin, zmax})).all())
                        .item<bool>();
  const int nblocks = skip ? 1 : 2, chunks = ceil_div(d.N, 8 * backward_row_tiles(d));
  Tensor dxs = at::empty_like(xc), none;
  dxs.select(0, L).zero_();
  Tensor dnext = skip ? Tensor() : at::empty({L, d.N, d.w}, xc.options());
  Tensor drho = skip ? Tensor() : at::empty({L, chunks}, xc.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "energies_backward_cuda", [&] {
    fused_backward<scalar_t>(k::EnergySource::kEnergies, xc, Tensor(), r, d, 2, nblocks, bias, Zc, g, coef, dxs, none,
                             dnext, drho);
  });
  if (skip) return {dxs, at::zeros({L}, rho.options())};
  dxs.narrow(0, 1, L).add_(dnext);
  return {dxs, drho.sum(1).to(rho.scalar_type())};
}

}  // namespace leakycuda
