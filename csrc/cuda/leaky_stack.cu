// CUDA launchers of leaky_stack / leaky_stack_backward: check arguments, pick a kernel instance, launch on torch's current stream.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../checks.h"
#include "../kernels/leaky_stack_instances.cuh"
#include "../leaky_stack.h"
#include "leaky_stack_cuda.h"

namespace leakycuda {
namespace {

namespace k = kernels;
using at::Tensor;

// ATen scalar type -> the CUDA type the kernels use.
template <typename S> struct KernelType { using type = S; };
template <> struct KernelType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct KernelType<at::Half> { using type = __half; };
template <typename S> using kt = typename KernelType<S>::type;
template <typename S> using kacc = k::acc_t<kt<S>>;

template <typename S> kt<S>* ptr(const Tensor& t) { return reinterpret_cast<kt<S>*>(t.data_ptr<S>()); }
template <typename S> kacc<S>* acc_ptr(const Tensor& t) { return reinterpret_cast<kacc<S>*>(t.data_ptr()); }
template <typename S> at::ScalarType acc_dtype() { return std::is_same_v<S, double> ? at::kDouble : at::kFloat; }

struct DeviceInfo {
  int sms = 1, smem_optin = 48 * 1024;
};

DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cache[dev] = d;
  return d;
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Raises a kernel's dynamic shared-memory limit, once per kernel and device.
void allow_smem(const void* kernel, int64_t bytes, int dev) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> done;
  std::lock_guard<std::mutex> lock(mu);
  int64_t& cur = done[{kernel, dev}];
  if (cur >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  cur = bytes;
}

// Blocks of the large-width elementwise kernels: a function of the size only, so the fixed-order
// partial sums of the backward are the same on every run.
int ew_blocks(int64_t n) { return int(std::max<int64_t>(1, std::min<int64_t>((n + k::kEwThreads - 1) / k::kEwThreads, 1024))); }

int bucket_of(int64_t w) { return w <= 64 ? 64 : w <= 128 ? 128 : 256; }

// Tensor-core kinds use n-major packed weights; the exact cores k-major.
template <typename S> bool uses_mma(bool tf32) { return std::is_same_v<S, float> ? tf32 : !std::is_same_v<S, double>; }

template <class C> struct Tag { using type = C; };

// Calls f(Tag<Core>{}) with the small-width core for storage type S, width bucket and row tiles mt.
// The instances are the ones listed in kernels/leaky_stack_instances.cuh.
template <class Kind, bool kMT4, class F> void with_mma(int bucket, int mt, F&& f) {
  if constexpr (kMT4) {
    if (mt == 4 && bucket == 64) return f(Tag<k::MmaCore<Kind, 64, 4>>{});
    if (mt == 4 && bucket == 128) return f(Tag<k::MmaCore<Kind, 128, 4>>{});
  }
  if (bucket == 64) return f(Tag<k::MmaCore<Kind, 64, 1>>{});
  if (bucket == 128) return f(Tag<k::MmaCore<Kind, 128, 1>>{});
  return f(Tag<k::MmaCore<Kind, 256, 1>>{});
}

template <typename T, class F> void with_fma(int bucket, F&& f) {
  if (bucket == 64) return f(Tag<k::FmaCore<T, 64>>{});
  if (bucket == 128) return f(Tag<k::FmaCore<T, 128>>{});
  return f(Tag<k::FmaCore<T, 256>>{});
}

template <typename S, bool kMT4, class F> void with_core(bool tf32, int bucket, int mt, F&& f) {
  if constexpr (std::is_same_v<S, float>) {
    if (tf32) with_mma<k::KindTF32, kMT4>(bucket, mt, f);
    else with_fma<float>(bucket, f);
  } else if constexpr (std::is_same_v<S, double>) {
    with_fma<double>(bucket, f);
  } else if constexpr (std::is_same_v<S, at::BFloat16>) {
    with_mma<k::KindBF16, kMT4>(bucket, mt, f);
  } else {
    with_mma<k::KindF16, kMT4>(bucket, mt, f);
  }
}

// Weight-ring depth: as deep as fits (at most 8), in half the SM's shared memory when there are enough
// CTAs for two per SM; 0 when even two stages do not fit.
template <class Core> int pick_stages(int Wp, int64_t ctas, const DeviceInfo& d) {
  const int64_t shared = ctas >= 2 * d.sms ? d.smem_optin / 2 - 1024 : d.smem_optin;
  for (const int64_t budget : {shared, int64_t(d.smem_optin)})
    for (int s = 8; s >= 2; --s)
      if (k::sweep_smem_bytes<Core>(Wp, s) <= budget) return s;
  return 0;
}

template <typename S> bool small_fits(bool tf32, int64_t w, const DeviceInfo& d) {
  if (w > k::kMaxSmallWidth) return false;
  bool ok = false;
  with_core<S, false>(tf32, bucket_of(w), 1, [&](auto tag) {
    using Core = typename decltype(tag)::type;
    ok = pick_stages<Core>(k::padded_width(int(w)), 1, d) > 0;
  });
  return ok;
}

template <typename S>
Tensor pack_weights(const Tensor& W, int64_t L, int64_t w, bool transpose, bool round_tf32, cudaStream_t stream) {
  const int Wp = k::padded_width(int(w));
  Tensor P = at::empty({L, k::packed_layer_elems(Wp)}, W.options());
  k::PackParams<kt<S>, kt<S>> p{};
  p.L = int(L), p.w = int(w), p.Wp = Wp, p.transpose = transpose, p.round_tf32 = round_tf32;
  p.W = ptr<S>(W), p.P = ptr<S>(P);
  const int blocks = int(std::min<int64_t>((P.numel() + 255) / 256, 4096));
  k::leaky_stack_pack_kernel<kt<S>, kt<S>><<<blocks, 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return P;
}

// Where a small-width forward writes (see kernels::StackFwdParams); rows of every tensor are w long.
template <typename S> struct FwdOut {
  kt<S>* all = nullptr;  // X_{lo+1} slot; X_{lo+j} at all + (j-1)*N*w
  kt<S>* states = nullptr;
  kt<S>* last = nullptr;
};

// Persistent forward over layers [lo, hi) from x ([N, w] contiguous) with forward-packed weights P.
template <typename S>
void forward_small(bool tf32, const Tensor& P, const Tensor& x, const Tensor& rho, double Lt, int64_t L, int64_t N,
                   int64_t w, int64_t lo, int64_t hi, int64_t checkpoint, FwdOut<S> out, const DeviceInfo& d,
                   int dev, cudaStream_t stream) {
  const int bucket = bucket_of(w), Wp = k::padded_width(int(w));
  const bool want_mt4 = uses_mma<S>(tf32) && bucket <= 128 && N >= int64_t(128) * d.sms;
  bool done = false;
  auto run = [&](auto tag) {
    using Core = typename decltype(tag)::type;
    const int64_t ctas = (N + Core::kRows - 1) / Core::kRows;
    const int stages = pick_stages<Core>(Wp, ctas, d);
    if (stages == 0) return;
    k::StackFwdParams<kt<S>, kt<S>> p{};
    p.N = int(N), p.w = int(w), p.Wp = Wp, p.L = int(L), p.layer_begin = int(lo), p.layer_end = int(hi);
    p.checkpoint = int(checkpoint), p.stages = stages, p.Lt = Lt;
    p.x = ptr<S>(x), p.ldx = w, p.packed = ptr<S>(P), p.rho = ptr<S>(rho);
    p.out_all = out.all, p.all_ld = w, p.all_stride = N * w;
    p.states = out.states, p.states_ld = w, p.states_stride = N * w;
    p.out_last = out.last, p.last_ld = w;
    const int64_t smem = k::sweep_smem_bytes<Core>(Wp, stages);
    auto kernel = k::leaky_stack_fwd_kernel<Core>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, dev);
    kernel<<<unsigned(ctas), Core::kThreads, size_t(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done = true;
  };
  if (want_mt4) with_core<S, true>(tf32, bucket, 4, run);
  if (!done) with_core<S, true>(tf32, bucket, 1, run);
  TORCH_INTERNAL_ASSERT(done, "leaky_stack: the small-width forward does not fit in shared memory");
}

// Large-width forward over layers [lo, hi) from x: per layer one GEMM [relu(X_i), 1] W_i^T into
// dest(i) (the slot of X_{i+1}) and one fused elementwise kernel.
template <typename S>
void forward_large(const Tensor& x, const Tensor& W, const Tensor& rho, double Lt, int64_t lo, int64_t hi,
                   const std::function<Tensor(int64_t)>& dest, cudaStream_t stream) {
  const int64_t N = x.size(0), w = x.size(1);
  Tensor R = at::empty({N, w + 1}, x.options());
  R.narrow(1, w, 1).fill_(1);
  Tensor Rv = R.narrow(1, 0, w);
  at::clamp_min_out(Rv, x, 0);
  Tensor prev = x;
  const int blocks = ew_blocks(N * w);
  for (int64_t i = lo; i < hi; ++i) {
    Tensor d = dest(i);
    at::mm_out(d, R, W[i].t());
    k::FwdEwParams<kt<S>> p{};
    p.N = N, p.w = int(w), p.Lt = Lt, p.x = ptr<S>(prev), p.ldx = w, p.xout = ptr<S>(d), p.ldo = w;
    p.r = ptr<S>(R), p.ldr = w + 1, p.rho = ptr<S>(rho) + i;
    k::leaky_stack_fwd_ew_kernel<kt<S>><<<blocks, k::kEwThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prev = d;
  }
}

// Small-width backward: per segment [lo, hi) (recomputed from its checkpoint when checkpoint > 1),
// one persistent sweep, one dW launch; then one drho launch for all layers.
template <typename S>
void backward_small(bool tf32, bool per_layer, const Tensor& g, const Tensor& st, const Tensor& W, const Tensor& rho,
                    double Lt, int64_t L, int64_t N, int64_t w, int64_t ck, Tensor& dx0, Tensor& dW, Tensor& drho,
                    const DeviceInfo& d, int dev, cudaStream_t stream) {
  using T = kt<S>;
  const auto acc_opts = g.options().dtype(acc_dtype<S>());
  const int bucket = bucket_of(w), Wp = k::padded_width(int(w));
  const bool mma = uses_mma<S>(tf32), round = std::is_same_v<S, float> && tf32;
  const Tensor Pb = pack_weights<S>(W, L, w, /*transpose=*/mma, round, stream);
  const Tensor Pf = ck > 1 ? pack_weights<S>(W, L, w, /*transpose=*/!mma, round, stream) : Tensor();

  Tensor carry = at::empty({N, w}, acc_opts);
  carry.copy_(per_layer ? g[L] : g);
  const int64_t layer_bytes = std::max<int64_t>(1, N * w * int64_t(sizeof(kacc<S>)));
  const int64_t seg = ck > 1 ? std::min(ck, L) : std::max<int64_t>(1, std::min<int64_t>({L, 64, (int64_t(512) << 20) / layer_bytes}));
  Tensor gseg = at::empty({seg, N, w}, acc_opts);
  Tensor xseg = ck > 1 ? at::empty({seg, N, w}, g.options()) : Tensor();
  const int tiles = int(((w + k::kDwTile - 1) / k::kDwTile) * ((w + 1 + k::kDwTile - 1) / k::kDwTile));
  Tensor tw = at::empty({L, tiles}, acc_opts);

  with_core<S, false>(tf32, bucket, 1, [&](auto tag) {
    using Core = typename decltype(tag)::type;
    const int64_t ctas = (N + Core::kRows - 1) / Core::kRows;
    const int stages = pick_stages<Core>(Wp, ctas, d);
    TORCH_INTERNAL_ASSERT(stages > 0, "leaky_stack_backward: the small-width sweep does not fit in shared memory");
    const int64_t smem = k::sweep_smem_bytes<Core>(Wp, stages);
    auto kernel = k::leaky_stack_bwd_kernel<Core>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, dev);
    const int64_t gx_count = ctas * Core::kWarps;
    Tensor gx = at::empty({L, gx_count}, acc_opts);

    for (int64_t hi = L; hi > 0;) {
      const int64_t lo = ck > 1 ? (hi - 1) / ck * ck : std::max<int64_t>(0, hi - seg);
      const T* xsrc;
      if (ck > 1) {
        const Tensor x_lo = st[lo / ck];
        xseg[0].copy_(x_lo);
        if (hi - lo > 1) {
          FwdOut<S> out;
          out.all = ptr<S>(xseg) + N * w;
          forward_small<S>(tf32, Pf, x_lo, rho, Lt, L, N, w, lo, hi - 1, 1, out, d, dev, stream);
        }
        xsrc = ptr<S>(xseg);
      } else {
        xsrc = ptr<S>(st) + lo * N * w;
      }

      k::StackBwdParams<T, T> p{};
      p.N = int(N), p.w = int(w), p.Wp = Wp, p.layer_begin = int(lo), p.layer_end = int(hi), p.stages = stages;
      p.gx_stride = int(gx_count), p.Lt = Lt;
      p.g = acc_ptr<S>(carry), p.ldg = w;
      p.xs = xsrc, p.xs_ld = w, p.xs_stride = N * w;
      p.grad_all = per_layer ? ptr<S>(g) : nullptr, p.ga_ld = w, p.ga_stride = N * w;
      p.packed = ptr<S>(Pb), p.rho = ptr<S>(rho);
      p.gseg = acc_ptr<S>(gseg), p.gseg_ld = w, p.gseg_stride = N * w;
      p.gx_partial = acc_ptr<S>(gx);
      kernel<<<unsigned(ctas), Core::kThreads, size_t(smem), stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      k::DwParams<T> q{};
      q.N = int(N), q.w = int(w), q.layer_begin = int(lo), q.layer_end = int(hi);
      q.gseg = acc_ptr<S>(gseg), q.gseg_ld = w, q.gseg_stride = N * w;
      q.xs = xsrc, q.xs_ld = w, q.xs_stride = N * w;
      q.W = ptr<S>(W), q.rho = ptr<S>(rho), q.dW = ptr<S>(dW), q.tw_partial = acc_ptr<S>(tw);
      const dim3 grid(unsigned(tiles), unsigned(hi - lo));
      if constexpr (std::is_same_v<S, double>) {
        k::leaky_stack_dw_kernel<T, false><<<grid, k::kDwThreads, 0, stream>>>(q);
      } else {
        if (mma) k::leaky_stack_dw_kernel<T, true><<<grid, k::kDwThreads, 0, stream>>>(q);
        else k::leaky_stack_dw_kernel<T, false><<<grid, k::kDwThreads, 0, stream>>>(q);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hi = lo;
    }

    k::DrhoParams<T> r{};
    r.L = int(L), r.tw_count = tiles, r.gx_count = int(gx_count), r.Lt = Lt;
    r.tw = acc_ptr<S>(tw), r.gx = acc_ptr<S>(gx), r.drho = ptr<S>(drho);
    k::leaky_stack_drho_kernel<T><<<unsigned(L), k::kRedThreads, 0, stream>>>(r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  dx0.copy_(carry);
}

// Large-width backward: per layer H = G_{i+1} V_i (GEMM), one fused elementwise kernel (G_i, relu(X_i),
// <G_{i+1}, X_i> partials), T_i = G_{i+1}^T [relu(X_i), 1] (GEMM into dW[i]); then dW = rho T and
// drho = <T, W> - Lt <G, X> over all layers.
template <typename S>
void backward_large(bool per_layer, const Tensor& g, const Tensor& st, const Tensor& W, const Tensor& rho, double Lt,
                    int64_t L, int64_t N, int64_t w, int64_t ck, Tensor& dx0, Tensor& dW, Tensor& drho,
                    cudaStream_t stream) {
  const auto acc = acc_dtype<S>();
  Tensor G = (per_layer ? g[L] : g).clone(at::MemoryFormat::Contiguous);
  Tensor Gn = at::empty_like(G), H = at::empty_like(G);
  Tensor R = at::empty({N, w + 1}, g.options());
  R.narrow(1, w, 1).fill_(1);
  const int blocks = ew_blocks(N * w);
  Tensor gx = at::empty({L, blocks}, g.options().dtype(acc));
  const int64_t seg = ck > 1 ? std::min(ck, L) : L;
  Tensor xseg = ck > 1 ? at::empty({seg, N, w}, g.options()) : Tensor();

  for (int64_t hi = L; hi > 0;) {
    const int64_t lo = ck > 1 ? (hi - 1) / ck * ck : 0;
    if (ck > 1) {
      xseg[0].copy_(st[lo / ck]);
      forward_large<S>(xseg[0], W, rho, Lt, lo, hi - 1, [&](int64_t i) { return xseg[i + 1 - lo]; }, stream);
    }
    for (int64_t i = hi - 1; i >= lo; --i) {
      const Tensor Xi = ck > 1 ? xseg[i - lo] : st[i];
      at::mm_out(H, G, W[i].narrow(1, 0, w));
      k::BwdEwParams<kt<S>> p{};
      p.N = N, p.w = int(w), p.Lt = Lt;
      p.g = ptr<S>(G), p.ldg = w, p.h = ptr<S>(H), p.ldh = w, p.x = ptr<S>(Xi), p.ldx = w;
      p.gadd = per_layer ? ptr<S>(g) + i * N * w : nullptr, p.ldga = w;
      p.gout = ptr<S>(Gn), p.ldgo = w, p.r = ptr<S>(R), p.ldr = w + 1;
      p.rho = ptr<S>(rho) + i, p.gx = acc_ptr<S>(gx) + i * blocks;
      k::leaky_stack_bwd_ew_kernel<kt<S>><<<blocks, k::kEwThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor dWi = dW[i];
      at::mm_out(dWi, G.t(), R);
      std::swap(G, Gn);
    }
    hi = lo;
  }
  const Tensor tw = (dW.to(acc) * W.to(acc)).sum({1, 2});
  drho.copy_(tw - Lt * gx.sum(1));
  dW.mul_(rho.view({L, 1, 1}));
  dx0.copy_(G);
}

}  // namespace

std::tuple<Tensor, Tensor> leaky_stack_cuda(const Tensor& x0, const Tensor& W, const Tensor& rho, double Lt,
                                            bool return_all, int64_t checkpoint) {
  const StackDims dims = check_stack_args(x0, W, rho, Lt, checkpoint, /*allow_half=*/true);
  c10::cuda::CUDAGuard guard(x0.device());
  if (!capturing()) check_rho_values(rho);
  const Tensor x = x0.contiguous(), Wc = W.contiguous(), rc = rho.contiguous();
  const int64_t L = dims.L, N = dims.N, w = dims.w, S = return_all ? 0 : num_states(L, checkpoint);
  Tensor out = return_all ? at::empty({L + 1, N, w}, x.options()) : at::empty({N, w}, x.options());
  Tensor states = at::empty({S, N, w}, x.options());
  if (return_all) out[0].copy_(x);
  else if (S > 0) states[0].copy_(x);
  if (L == 0 && !return_all) out.copy_(x);
  if (L == 0 || N == 0) return {out, states};

  const int dev = x.get_device();
  const DeviceInfo info = device_info(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leaky_stack_cuda", [&] {
    if (small_fits<scalar_t>(tf32, w, info)) {
      const bool mma = uses_mma<scalar_t>(tf32);
      const Tensor P = pack_weights<scalar_t>(Wc, L, w, /*transpose=*/!mma, std::is_same_v<scalar_t, float> && tf32, stream);
      FwdOut<scalar_t> o;
      if (return_all) o.all = ptr<scalar_t>(out) + N * w;
      else o.states = ptr<scalar_t>(states), o.last = ptr<scalar_t>(out);
      forward_small<scalar_t>(tf32, P, x, rc, Lt, L, N, w, 0, L, checkpoint, o, info, dev, stream);
    } else {
      Tensor ping[2];
      auto dest = [&](int64_t i) -> Tensor {
        const int64_t j = i + 1;
        if (return_all) return out[j];
        if (j == L) return out;
        if (j % checkpoint == 0) return states[j / checkpoint];
        if (!ping[j & 1].defined()) ping[j & 1] = at::empty({N, w}, x.options());
        return ping[j & 1];
      };
      forward_large<scalar_t>(x, Wc, rc, Lt, 0, L, dest, stream);
    }
  });
  return {out, states};
}

std::tuple<Tensor, Tensor, Tensor> leaky_stack_backward_cuda(const Tensor& grad, const Tensor& states, const Tensor& W,
                                                             const Tensor& rho, double Lt, int64_t checkpoint) {
  const StackDims dims = check_stack_backward_args(grad, states, W, rho, Lt, checkpoint, /*allow_half=*/true);
  c10::cuda::CUDAGuard guard(grad.device());
  if (!capturing()) check_rho_values(rho);
  const Tensor g = grad.contiguous(), st = states.contiguous(), Wc = W.contiguous(), rc = rho.contiguous();
  const int64_t L = dims.L, N = dims.N, w = dims.w;
  const bool per_layer = g.dim() == 3;
  Tensor dx0 = at::empty({N, w}, g.options());
  Tensor dW = at::empty({L, w, w + 1}, g.options());
  Tensor drho = at::empty({L}, g.options());
  if (L == 0) {
    dx0.copy_(per_layer ? g[0] : g);
    return {dx0, dW, drho};
  }
  if (N == 0 || w == 0) {
    dW.zero_();
    drho.zero_();
    return {dx0, dW, drho};
  }

  const int dev = g.get_device();
  const DeviceInfo info = device_info(dev);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "leaky_stack_backward_cuda", [&] {
    if (small_fits<scalar_t>(tf32, w, info))
      backward_small<scalar_t>(tf32, per_layer, g, st, Wc, rc, Lt, L, N, w, checkpoint, dx0, dW, drho, info, dev, stream);
    else
      backward_large<scalar_t>(per_layer, g, st, Wc, rc, Lt, L, N, w, checkpoint, dx0, dW, drho, stream);
  });
  return {dx0, dW, drho};
}

}  // namespace leakycuda

TORCH_LIBRARY_IMPL(leakycuda, CUDA, m) {
  m.impl("leaky_stack", &leakycuda::leaky_stack_cuda);
  m.impl("leaky_stack_backward", &leakycuda::leaky_stack_backward_cuda);
}
