// Internal header of the CUDA leaky-stack launchers: helpers and the launch templates, one instance per
// activation. leaky_stack.cu holds the op entry points; leaky_stack_relu.cu and leaky_stack_linear.cu each
// instantiate the launches (and so the kernels) of one activation, so that nvcc builds them in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <functional>
#include <type_traits>
#include <utility>

#include "../kernels/leaky_stack_instances.cuh"
#include "device_utils.h"
#include "../leaky_stack.h"

namespace leakycuda {
namespace stack_cuda {

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

using cuda_util::allow_smem;
using cuda_util::capturing;
using cuda_util::device_info;
using cuda_util::DeviceInfo;

// What one call runs on: sizes (B models of L layers, width w, N rows), the shared Lt and the optional
// per-model Lt ([B] float64 on the device), the device and torch's current stream.
struct Launch {
  int64_t B, L, N, w;
  double Lt;
  const double* model_Lt;
  bool tf32;
  DeviceInfo info;
  int dev;
  cudaStream_t stream;
};

// Grid size of B models x `per_model` CTAs (the model index is blockIdx.x / per_model).
inline unsigned model_grid(const Launch& c, int64_t per_model) {
  const int64_t n = c.B * per_model;
  TORCH_CHECK_VALUE(n <= INT_MAX, "leaky_stack: ", c.B, " models x ", per_model,
                    " blocks per model exceed one CUDA launch (2^31 - 1 blocks); split the models into smaller groups");
  return unsigned(n);
}

// Blocks per model of the large-width elementwise kernels: a function of the size only, so the
// fixed-order partial sums of the backward are the same on every run.
inline int ew_blocks(int64_t n) { return int(std::max<int64_t>(1, std::min<int64_t>((n + k::kEwThreads - 1) / k::kEwThreads, 1024))); }

// Row blocks of the <G, P> fallback of drho (leaky_stack_tw_fallback_kernel): a function of N only, so the
// order of its partial sums is fixed.
inline int gp_row_blocks(int64_t N) { return int(std::max<int64_t>(1, std::min<int64_t>((N + 15) / 16, 1024))); }

inline int bucket_of(int64_t w) { return w <= 64 ? 64 : w <= 128 ? 128 : 256; }

// Tensor-core kinds use n-major packed weights; the exact cores k-major.
template <typename S> bool uses_mma(bool tf32) { return std::is_same_v<S, float> ? tf32 : !std::is_same_v<S, double>; }

template <class C> struct Tag { using type = C; };

// The torch-free kernels' name of the op's activation (for visit_activation from leaky_stack.h).
constexpr k::Act kernel_act(Activation act) { return act == Activation::kRelu ? k::Act::kRelu : k::Act::kLinear; }

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

// Packs every layer of every model of W ([B, L, w, w+1] contiguous) into [B * L, Wp*Wp + Wp].
template <typename S>
Tensor pack_weights(const Launch& c, const Tensor& W, bool transpose, bool round_tf32) {
  const int Wp = k::padded_width(int(c.w));
  Tensor P = at::empty({c.B * c.L, k::packed_layer_elems(Wp)}, W.options());
  k::PackParams<kt<S>, kt<S>> p{};
  p.L = int(c.B * c.L), p.w = int(c.w), p.Wp = Wp, p.transpose = transpose, p.round_tf32 = round_tf32;
  p.W = ptr<S>(W), p.P = ptr<S>(P);
  const int blocks = int(std::min<int64_t>((P.numel() + 255) / 256, 4096));
  k::leaky_stack_pack_kernel<kt<S>, kt<S>><<<blocks, 256, 0, c.stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return P;
}

// Where a small-width forward reads and writes (see kernels::StackFwdParams); rows of every tensor are
// w long, and `*_bs` is the element stride from one model to the next.
template <typename S> struct FwdIO {
  const kt<S>* x = nullptr;  // X_lo of model 0
  int64_t x_bs = 0;
  kt<S>* all = nullptr;  // X_{lo+1} slot of model 0; X_{lo+j} at all + (j-1)*N*w
  int64_t all_bs = 0;
  kt<S>* states = nullptr;
  int64_t states_bs = 0;
  kt<S>* last = nullptr;
  int64_t last_bs = 0;
};

// Persistent forward over layers [lo, hi) of every model with forward-packed weights P.
template <typename S, k::Act kAct>
void forward_small(const Launch& c, const Tensor& P, const Tensor& rho, int64_t lo, int64_t hi, int64_t checkpoint,
                   const FwdIO<S>& io) {
  const int64_t N = c.N, w = c.w;
  const int bucket = bucket_of(w), Wp = k::padded_width(int(w));
  const bool want_mt4 = uses_mma<S>(c.tf32) && bucket <= 128 && c.B * N >= int64_t(128) * c.info.sms;
  bool done = false;
  auto run = [&](auto tag) {
    using Core = typename decltype(tag)::type;
    const unsigned ctas = model_grid(c, (N + Core::kRows - 1) / Core::kRows);
    const int stages = pick_stages<Core>(Wp, ctas, c.info);
    if (stages == 0) return;
    k::StackFwdParams<kt<S>, kt<S>> p{};
    p.N = int(N), p.w = int(w), p.Wp = Wp, p.L = int(c.L), p.layer_begin = int(lo), p.layer_end = int(hi);
    p.checkpoint = int(checkpoint), p.stages = stages, p.Lt = c.Lt, p.model_Lt = c.model_Lt;
    p.x = io.x, p.ldx = w, p.x_bs = io.x_bs;
    p.packed = ptr<S>(P), p.packed_bs = c.L * P.size(1);
    p.rho = ptr<S>(rho), p.rho_bs = c.L;
    p.out_all = io.all, p.all_ld = w, p.all_stride = N * w, p.all_bs = io.all_bs;
    p.states = io.states, p.states_ld = w, p.states_stride = N * w, p.states_bs = io.states_bs;
    p.out_last = io.last, p.last_ld = w, p.last_bs = io.last_bs;
    const int64_t smem = k::sweep_smem_bytes<Core>(Wp, stages);
    auto kernel = k::leaky_stack_fwd_kernel<Core, kAct>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, c.dev);
    kernel<<<ctas, Core::kThreads, size_t(smem), c.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    done = true;
  };
  if (want_mt4) with_core<S, true>(c.tf32, bucket, 4, run);
  if (!done) with_core<S, true>(c.tf32, bucket, 1, run);
  TORCH_INTERNAL_ASSERT(done, "leaky_stack: the small-width forward does not fit in shared memory");
}

// Large-width forward over layers [lo, hi) from x ([B, N, w], each model's [N, w] contiguous): per layer
// one batched GEMM [act(X_i), 1] W_i^T into dest(i) (the [B, N, w] slot of X_{i+1}) and one fused
// elementwise kernel for every model.
template <typename S, k::Act kAct>
void forward_large(const Launch& c, const Tensor& x, const Tensor& W, const Tensor& rho, int64_t lo, int64_t hi,
                   const std::function<Tensor(int64_t)>& dest) {
  const int64_t B = c.B, N = c.N, w = c.w;
  Tensor R = at::empty({B, N, w + 1}, x.options());
  R.narrow(2, w, 1).fill_(1);
  Tensor Rv = R.narrow(2, 0, w);
  if constexpr (kAct == k::Act::kRelu) at::clamp_min_out(Rv, x, 0);  // torch.relu: NaN stays NaN
  else Rv.copy_(x);
  Tensor prev = x;
  const int blocks = ew_blocks(N * w);
  for (int64_t i = lo; i < hi; ++i) {
    Tensor d = dest(i);
    at::bmm_out(d, R, W.select(1, i).transpose(1, 2));
    k::FwdEwParams<kt<S>> p{};
    p.N = N, p.w = int(w), p.blocks = blocks, p.Lt = c.Lt, p.model_Lt = c.model_Lt;
    p.x = ptr<S>(prev), p.ldx = w, p.x_bs = prev.stride(0);
    p.xout = ptr<S>(d), p.ldo = w, p.o_bs = d.stride(0);
    p.r = ptr<S>(R), p.ldr = w + 1, p.r_bs = N * (w + 1);
    p.rho = ptr<S>(rho) + i, p.rho_bs = c.L;
    k::leaky_stack_fwd_ew_kernel<kt<S>, kAct><<<model_grid(c, blocks), k::kEwThreads, 0, c.stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prev = d;
  }
}

// Most layers one dW launch covers (its grid.y).
constexpr int64_t kMaxGridY = 65535;

// Small-width backward: per segment [lo, hi) (recomputed from its checkpoint when checkpoint > 1), one
// persistent sweep and one dW launch for every model; then one drho launch for every (model, layer).
// g: [B, N, w] or [B, L+1, N, w] (per_layer); st: [B, S', N, w]; W: [B, L, w, w+1]; rho: [B, L].
template <typename S, k::Act kAct>
void backward_small(const Launch& c, bool per_layer, const Tensor& g, const Tensor& st, const Tensor& W,
                    const Tensor& rho, int64_t ck, Tensor& dx0, Tensor& dW, Tensor& drho) {
  using T = kt<S>;
  const int64_t B = c.B, L = c.L, N = c.N, w = c.w, nw = N * w;
  const auto acc_opts = g.options().dtype(acc_dtype<S>());
  const int bucket = bucket_of(w), Wp = k::padded_width(int(w));
  const bool mma = uses_mma<S>(c.tf32), round = std::is_same_v<S, float> && c.tf32;
  const Tensor Pb = pack_weights<S>(c, W, /*transpose=*/mma, round);
  const Tensor Pf = ck > 1 ? pack_weights<S>(c, W, /*transpose=*/!mma, round) : Tensor();

  Tensor carry = at::empty({B, N, w}, acc_opts);
  carry.copy_(per_layer ? g.select(1, L) : g);
  const int64_t layer_bytes = std::max<int64_t>(1, B * nw * int64_t(sizeof(kacc<S>)));
  const int64_t seg = ck > 1 ? std::min(ck, L) : std::max<int64_t>(1, std::min<int64_t>({L, 64, (int64_t(512) << 20) / layer_bytes}));
  Tensor gseg = at::empty({B, seg, N, w}, acc_opts);
  Tensor xseg = ck > 1 ? at::empty({B, seg, N, w}, g.options()) : Tensor();
  const int tiles = k::dw_tiles(int(w)), gpc = gp_row_blocks(N);
  Tensor tw = at::empty({B, L, tiles}, acc_opts), gp = at::empty({B, L, gpc}, acc_opts);

  with_core<S, false>(c.tf32, bucket, 1, [&](auto tag) {
    using Core = typename decltype(tag)::type;
    const int64_t row_tiles = (N + Core::kRows - 1) / Core::kRows;
    const unsigned ctas = model_grid(c, row_tiles);
    const int stages = pick_stages<Core>(Wp, ctas, c.info);
    TORCH_INTERNAL_ASSERT(stages > 0, "leaky_stack_backward: the small-width sweep does not fit in shared memory");
    const int64_t smem = k::sweep_smem_bytes<Core>(Wp, stages);
    auto kernel = k::leaky_stack_bwd_kernel<Core, kAct>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem, c.dev);
    const int64_t gx_count = row_tiles * Core::kWarps;
    Tensor gx = at::empty({B, L, gx_count}, acc_opts);

    for (int64_t hi = L; hi > 0;) {
      const int64_t lo = ck > 1 ? (hi - 1) / ck * ck : std::max<int64_t>(0, hi - seg);
      const T* xsrc;
      int64_t xs_bs;
      if (ck > 1) {
        xseg.select(1, 0).copy_(st.select(1, lo / ck));
        if (hi - lo > 1) {
          FwdIO<S> io;
          io.x = ptr<S>(xseg), io.x_bs = seg * nw;
          io.all = ptr<S>(xseg) + nw, io.all_bs = seg * nw;
          forward_small<S, kAct>(c, Pf, rho, lo, hi - 1, 1, io);
        }
        xsrc = ptr<S>(xseg), xs_bs = seg * nw;
      } else {
        xsrc = ptr<S>(st) + lo * nw, xs_bs = st.stride(0);
      }

      k::StackBwdParams<T, T> p{};
      p.N = int(N), p.w = int(w), p.Wp = Wp, p.layer_begin = int(lo), p.layer_end = int(hi), p.stages = stages;
      p.gx_stride = int(gx_count), p.Lt = c.Lt, p.model_Lt = c.model_Lt;
      p.g = acc_ptr<S>(carry), p.ldg = w, p.g_bs = nw;
      p.xs = xsrc, p.xs_ld = w, p.xs_stride = nw, p.xs_bs = xs_bs;
      p.grad_all = per_layer ? ptr<S>(g) : nullptr, p.ga_ld = w, p.ga_stride = nw, p.ga_bs = (L + 1) * nw;
      p.packed = ptr<S>(Pb), p.packed_bs = L * Pb.size(1);
      p.rho = ptr<S>(rho), p.rho_bs = L;
      p.gseg = acc_ptr<S>(gseg), p.gseg_ld = w, p.gseg_stride = nw, p.gseg_bs = seg * nw;
      p.gx_partial = acc_ptr<S>(gx), p.gx_bs = L * gx_count;
      kernel<<<ctas, Core::kThreads, size_t(smem), c.stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      for (int64_t l0 = lo; l0 < hi; l0 += kMaxGridY) {
        const int64_t l1 = std::min(hi, l0 + kMaxGridY);
        k::DwParams<T> q{};
        q.N = int(N), q.w = int(w), q.L = int(L), q.layer_begin = int(l0), q.layer_end = int(l1);
        q.gseg = acc_ptr<S>(gseg) + (l0 - lo) * nw, q.gseg_ld = w, q.gseg_stride = nw, q.gseg_bs = seg * nw;
        q.xs = xsrc + (l0 - lo) * nw, q.xs_ld = w, q.xs_stride = nw, q.xs_bs = xs_bs;
        q.W = ptr<S>(W), q.rho = ptr<S>(rho), q.dW = ptr<S>(dW), q.tw_partial = acc_ptr<S>(tw);
        const dim3 grid(model_grid(c, tiles), unsigned(l1 - l0));
        if constexpr (std::is_same_v<S, double>) {
          k::leaky_stack_dw_kernel<T, false, kAct><<<grid, k::kDwThreads, 0, c.stream>>>(q);
        } else {
          if (mma) k::leaky_stack_dw_kernel<T, true, kAct><<<grid, k::kDwThreads, 0, c.stream>>>(q);
          else k::leaky_stack_dw_kernel<T, false, kAct><<<grid, k::kDwThreads, 0, c.stream>>>(q);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }

      k::TwFallbackParams<T, kacc<S>> f{};
      f.N = int(N), f.w = int(w), f.L = int(L), f.layer_begin = int(lo), f.layer_end = int(hi);
      f.tw_count = tiles, f.gp_count = gpc;
      f.g = acc_ptr<S>(gseg), f.g_ld = w, f.g_stride = nw, f.g_bs = seg * nw;
      f.xs = xsrc, f.xs_ld = w, f.xs_stride = nw, f.xs_bs = xs_bs;
      f.W = ptr<S>(W), f.tw = acc_ptr<S>(tw), f.gp = acc_ptr<S>(gp);
      const dim3 fgrid(model_grid(c, hi - lo), unsigned(gpc));
      k::leaky_stack_tw_fallback_kernel<T, kacc<S>, kAct><<<fgrid, k::kRedThreads, 0, c.stream>>>(f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      hi = lo;
    }

    k::DrhoParams<T> r{};
    r.L = int(L), r.tw_count = tiles, r.gx_count = int(gx_count), r.gp_count = gpc, r.Lt = c.Lt;
    r.model_Lt = c.model_Lt, r.tw = acc_ptr<S>(tw), r.gx = acc_ptr<S>(gx), r.gp = acc_ptr<S>(gp), r.drho = ptr<S>(drho);
    k::leaky_stack_drho_kernel<T><<<model_grid(c, L), k::kRedThreads, 0, c.stream>>>(r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  dx0.copy_(carry);
}

// Large-width backward: per layer H = G_{i+1} V_i (batched GEMM), one fused elementwise kernel (G_i,
// act(X_i), <G_{i+1}, X_i> partials), T_i = G_{i+1}^T [act(X_i), 1] (batched GEMM into dW[:, i]) and
// <T_i, W_i> (or <G_{i+1}, P_i> where that is not finite); then dW = rho T and drho over every layer of
// every model. Shapes as backward_small.
template <typename S, k::Act kAct>
void backward_large(const Launch& c, bool per_layer, const Tensor& g, const Tensor& st, const Tensor& W,
                    const Tensor& rho, const Tensor& model_Lt, int64_t ck, Tensor& dx0, Tensor& dW, Tensor& drho) {
  const int64_t B = c.B, L = c.L, N = c.N, w = c.w, nw = N * w;
  const auto acc = acc_dtype<S>();
  Tensor G = (per_layer ? g.select(1, L) : g).clone(at::MemoryFormat::Contiguous);
  Tensor Gn = at::empty_like(G), H = at::empty_like(G);
  Tensor R = at::empty({B, N, w + 1}, g.options());
  R.narrow(2, w, 1).fill_(1);
  const int blocks = ew_blocks(nw);
  Tensor gx = at::empty({B, L, blocks}, g.options().dtype(acc));
  const int gpc = gp_row_blocks(N);
  Tensor tw = at::empty({B, L}, g.options().dtype(acc)), gp = at::zeros({B, L, gpc}, g.options().dtype(acc));
  const int64_t seg = ck > 1 ? std::min(ck, L) : L;
  Tensor xseg = ck > 1 ? at::empty({B, seg, N, w}, g.options()) : Tensor();

  for (int64_t hi = L; hi > 0;) {
    const int64_t lo = ck > 1 ? (hi - 1) / ck * ck : 0;
    if (ck > 1) {
      xseg.select(1, 0).copy_(st.select(1, lo / ck));
      forward_large<S, kAct>(c, xseg.select(1, 0), W, rho, lo, hi - 1,
                             [&](int64_t i) { return xseg.select(1, i + 1 - lo); });
    }
    for (int64_t i = hi - 1; i >= lo; --i) {
      const Tensor Xi = ck > 1 ? xseg.select(1, i - lo) : st.select(1, i);
      at::bmm_out(H, G, W.select(1, i).narrow(2, 0, w));
      k::BwdEwParams<kt<S>> p{};
      p.N = N, p.w = int(w), p.blocks = blocks, p.Lt = c.Lt, p.model_Lt = c.model_Lt;
      p.g = ptr<S>(G), p.ldg = w, p.g_bs = nw;
      p.h = ptr<S>(H), p.ldh = w, p.h_bs = nw;
      p.x = ptr<S>(Xi), p.ldx = w, p.x_bs = Xi.stride(0);
      p.gadd = per_layer ? ptr<S>(g) + i * nw : nullptr, p.ldga = w, p.ga_bs = (L + 1) * nw;
      p.gout = ptr<S>(Gn), p.ldgo = w, p.go_bs = nw;
      p.r = ptr<S>(R), p.ldr = w + 1, p.r_bs = N * (w + 1);
      p.rho = ptr<S>(rho) + i, p.rho_bs = L;
      p.gx = acc_ptr<S>(gx) + i * blocks, p.gx_bs = L * blocks;
      k::leaky_stack_bwd_ew_kernel<kt<S>, kAct><<<model_grid(c, blocks), k::kEwThreads, 0, c.stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Tensor dWi = dW.select(1, i);
      at::bmm_out(dWi, G.transpose(1, 2), R);
      tw.select(1, i).copy_((dWi.to(acc) * W.select(1, i).to(acc)).sum({1, 2}));
      k::TwFallbackParams<kt<S>, kt<S>> f{};
      f.N = int(N), f.w = int(w), f.L = int(L), f.layer_begin = int(i), f.layer_end = int(i + 1);
      f.tw_count = 1, f.gp_count = gpc;
      f.g = ptr<S>(G), f.g_ld = w, f.g_stride = nw, f.g_bs = nw;
      f.xs = ptr<S>(Xi), f.xs_ld = w, f.xs_stride = nw, f.xs_bs = Xi.stride(0);
      f.W = ptr<S>(W), f.tw = acc_ptr<S>(tw), f.gp = acc_ptr<S>(gp);
      const dim3 fgrid(model_grid(c, 1), unsigned(gpc));
      k::leaky_stack_tw_fallback_kernel<kt<S>, kt<S>, kAct><<<fgrid, k::kRedThreads, 0, c.stream>>>(f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(G, Gn);
    }
    hi = lo;
  }
  const Tensor twp = at::where(at::isfinite(tw), tw, gp.sum(2)), gxs = gx.sum(2);
  drho.copy_(model_Lt.defined() ? twp - model_Lt.to(acc).unsqueeze(1) * gxs : twp - c.Lt * gxs);
  dW.mul_(rho.view({B, L, 1, 1}));
  dx0.copy_(G);
}


// Forward of every model over all L layers: x [B, N, w], Wc [B, L, w, w+1], rc [B, L] (contiguous) into outB
// ([B, L+1, N, w] when return_all, else [B, N, w]) and statesB ([B, S, N, w]); X_0 is already in place.
template <k::Act kAct>
void stack_forward(const Launch& c, const Tensor& x, const Tensor& Wc, const Tensor& rc, bool return_all,
                   int64_t checkpoint, const Tensor& outB, const Tensor& statesB) {
  const int64_t B = c.B, L = c.L, N = c.N, w = c.w, nw = N * w, S = statesB.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "leaky_stack_cuda", [&] {
    if (small_fits<scalar_t>(c.tf32, w, c.info)) {
      const bool mma = uses_mma<scalar_t>(c.tf32);
      const Tensor P = pack_weights<scalar_t>(c, Wc, /*transpose=*/!mma, std::is_same_v<scalar_t, float> && c.tf32);
      FwdIO<scalar_t> io;
      io.x = ptr<scalar_t>(x), io.x_bs = nw;
      if (return_all) io.all = ptr<scalar_t>(outB) + nw, io.all_bs = (L + 1) * nw;
      else io.states = ptr<scalar_t>(statesB), io.states_bs = S * nw, io.last = ptr<scalar_t>(outB), io.last_bs = nw;
      forward_small<scalar_t, kAct>(c, P, rc, 0, L, checkpoint, io);
    } else {
      Tensor ping[2];
      auto dest = [&](int64_t i) -> Tensor {
        const int64_t j = i + 1;
        if (return_all) return outB.select(1, j);
        if (j == L) return outB;
        if (j % checkpoint == 0) return statesB.select(1, j / checkpoint);
        if (!ping[j & 1].defined()) ping[j & 1] = at::empty({B, N, w}, x.options());
        return ping[j & 1];
      };
      forward_large<scalar_t, kAct>(c, x, Wc, rc, 0, L, dest);
    }
  });
}

// Backward of every model: g [B, N, w] or [B, L+1, N, w] (per_layer), st [B, S', N, w], Wc, rc as the
// forward's, mlt the per-model Lt (or undefined); writes dx0B [B, N, w], dWB [B, L, w, w+1], drhoB [B, L].
template <k::Act kAct>
void stack_backward(const Launch& c, bool per_layer, const Tensor& g, const Tensor& st, const Tensor& Wc,
                    const Tensor& rc, const Tensor& mlt, int64_t checkpoint, Tensor& dx0B, Tensor& dWB, Tensor& drhoB) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "leaky_stack_backward_cuda", [&] {
    if (small_fits<scalar_t>(c.tf32, c.w, c.info))
      backward_small<scalar_t, kAct>(c, per_layer, g, st, Wc, rc, checkpoint, dx0B, dWB, drhoB);
    else
      backward_large<scalar_t, kAct>(c, per_layer, g, st, Wc, rc, mlt, checkpoint, dx0B, dWB, drhoB);
  });
}

// Instantiated in leaky_stack_relu.cu and leaky_stack_linear.cu.
#define LEAKY_STACK_LAUNCHES(EXTERN, ACT)                                                                      \
  EXTERN template void stack_forward<ACT>(const Launch&, const Tensor&, const Tensor&, const Tensor&, bool,     \
                                          int64_t, const Tensor&, const Tensor&);                              \
  EXTERN template void stack_backward<ACT>(const Launch&, bool, const Tensor&, const Tensor&, const Tensor&,    \
                                           const Tensor&, const Tensor&, int64_t, Tensor&, Tensor&, Tensor&);
LEAKY_STACK_LAUNCHES(extern, k::Act::kRelu)
LEAKY_STACK_LAUNCHES(extern, k::Act::kLinear)

}  // namespace stack_cuda
}  // namespace leakycuda
