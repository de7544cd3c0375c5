// Torch-free device code of the fused Cost-of-Identity / K-norm / energies kernels (sm_80+): one pass over
// every X_l builds the float64 Grams S^T [S | M] and the norms ||M_k||^2 of all entries (layers) at once,
// one launch solves every small ridge system in shared memory, and one fused pass forms the gradients.
//
// Notation (csrc/energies.h): entry b has the metric X_b [N, w], S = sigma(X_b) = [act(X_b), 1] ([N, p]) and
// blocks * m columns M_b whose K-norms are taken: M = X_b (COI), a given M (K-norm), or for the energies
// [X_b | X_{b+1} - X_b] (the second block is D_b * rho_b; the solve divides it by rho_b).
// Every product and sum is float64 on the float64 tensor cores (mma.sync m8n8k4): float32 products are
// exact in float64, so the Grams carry float64 accuracy and the value can be taken from them
// ((||M||^2 - <S^T M, Z>) / gamma, with a cancellation check that sends ill-conditioned entries back to
// the residual form of the device-generic path). All reductions run in a fixed order: results do not
// depend on scheduling.
#pragma once

#include <cstdint>

namespace leakycuda {
namespace kernels {

// Where the columns M of a problem come from.
enum class EnergySource : int { kCoi = 0, kKNorm = 1, kEnergies = 2 };

// Bits of the solve kernel's per-entry flag: where it cannot give the CPU kernel's result, the launcher
// falls back to the device-generic implementation.
inline constexpr int kFlagNonFinite = 1;  // the Gram is not finite (NaN/inf inputs)
inline constexpr int kFlagGamma = 2;      // gamma0 policy: lambda_max not certified (linear, or not converged)
inline constexpr int kFlagSolve = 4;      // a pivot of A + gamma I was not positive (rounding)
inline constexpr int kFlagValue = 8;      // the Gram-form value loses more than ~6 digits to cancellation

inline constexpr int kThreads = 256;  // every kernel here runs 8 warps
inline constexpr int kWarps = kThreads / 32;

// Gram kernel tile: a CTA computes rows [64 rb, 64 rb + 64) x columns [128 cb, 128 cb + 128) of
// T_b = S^T [S | M] over all N samples, 32 samples per shared-memory chunk; warp (wr, wc) = (warp / 4,
// warp % 4) owns row tiles 4 wr .. 4 wr + 3 and column tiles 4 wc .. 4 wc + 3 (8 x 8 tiles).
inline constexpr int kGramRows = 64, kGramCols = 128, kGramChunk = 32;
// Shared row strides, in doubles, = 4 (mod 16): the m8n8k4 fragment reads of a half-warp (g = 0..3,
// t = 0..3 at address t * stride + g) then hit 16 distinct 8-byte banks.
inline constexpr int kGramRS = kGramRows + 4, kGramCS = kGramCols + 4;
__host__ __device__ constexpr int gram_smem_bytes() { return kGramChunk * (kGramRS + kGramCS) * 8; }

// The solve kernel holds the padded p x p matrix in shared memory: p <= kSolveMaxP.
inline constexpr int kSolveMaxP = 144, kSolveCols = 32, kSolveRS = kSolveCols + 4;
inline constexpr int kPowerMaxIters = 300;
inline constexpr double kPowerTol = 1e-13;   // relative width of the certified [lo, hi] bracket of lambda_max
inline constexpr double kCancelTol = 1e-6;   // (||M||^2 - <S^T M, Z>) must keep this fraction of ||M||^2
__host__ __device__ constexpr int pad8(int n) { return (n + 7) / 8 * 8; }
// A stride >= n that is 4 (mod 16).
__host__ __device__ constexpr int stride4(int n) { return n + ((4 - n % 16) + 16) % 16; }
__host__ __device__ constexpr int solve_lda(int p) { return stride4(pad8(p)); }
__host__ __device__ constexpr int solve_smem_bytes(int p) {
  return (pad8(p) * solve_lda(p) + pad8(p) * kSolveRS + 2 * pad8(p) + 4 * kWarps) * 8;
}

// Backward kernel: a CTA takes 8 * kRT rows of one entry; every warp owns all kRT row tiles and the
// column tiles warp, warp + 8, ... (up to 8 / kRT of them), so at most 8 tiles of 8 x 8 per warp.
// Columns (m and w) padded to 8 must not exceed 512 / kRT.
inline constexpr int kBwdMaxTiles = 8;
__host__ __device__ constexpr int bwd_max_cols(int kRT) { return 8 * kWarps * (kBwdMaxTiles / kRT); }
__host__ __device__ constexpr int bwd_smem_bytes(int kRT, int p, int m) {
  return 8 * kRT * (stride4(pad8(p)) + stride4(pad8(m))) * 8 + 2 * kWarps * 8;
}

template <bool kRelu> __device__ __forceinline__ double act(double v) { return kRelu ? (v < 0.0 ? 0.0 : v) : v; }

// D = A * B + D for one m8n8k4 float64 tile. Fragments (g = lane / 4, t = lane % 4): a = A[g][t],
// b = B[t][g], d = {D[g][2t], D[g][2t+1]}.
__device__ __forceinline__ void mma_f64(double (&d)[2], double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a), "d"(b));
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA in a fixed order (warp butterflies, then the warps in order); every thread gets it.
// `red` holds kWarps doubles of shared scratch.
__device__ __forceinline__ double block_sum(double v, double* red) {
  v = warp_sum_f64(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  for (int i = 0; i < kWarps; ++i) s += red[i];
  return s;
}

// The operands of one problem, read straight from the caller's tensors (T = float or double).
template <typename T>
struct EnergyOperands {
  const T* X;  // [B, N, w] (kEnergies: xs, [B+1, N, w])
  const T* M;  // kKNorm: [B, N, m]
  int64_t N;
  int w, p, m, blocks;
  bool bias;
  EnergySource src;

  // sigma(X_b)[n][j] for j < p; 0 for the padding j >= p.
  template <bool kRelu>
  __device__ __forceinline__ double s(int64_t b, int64_t n, int j) const {
    if (j < w) return act<kRelu>(double(X[(b * N + n) * w + j]));
    return bias && j == w ? 1.0 : 0.0;
  }
  // X_b[n][j].
  __device__ __forceinline__ double x(int64_t b, int64_t n, int j) const { return double(X[(b * N + n) * w + j]); }
  // Column c of M_b at sample n (c < m * blocks; 0 beyond): block 1 of the energies is X_{b+1} - X_b.
  __device__ __forceinline__ double mcol(int64_t b, int64_t n, int c) const {
    if (c >= m * blocks) return 0.0;
    if (src == EnergySource::kKNorm) return double(M[(b * N + n) * m + c]);
    const T* xr = X + (b * N + n) * w;
    if (c < m) return double(xr[c]);
    c -= m;
    return double(xr[N * w + c]) - double(xr[c]);
  }
};

// ---------------------------------------------------------------------------------------------------
// Pass 1: Grams and norms of every entry.

template <typename T>
struct GramParams {
  EnergyOperands<T> op;
  int64_t B;
  int ld;          // p + m * blocks: the columns of T
  int row_blocks;  // ceil(p / kGramRows)
  int col_blocks;  // ceil(ld / kGramCols)
  double* Tg;      // [B, p, ld]: S^T S (lower triangle; whole 8 x 8 diagonal tiles), then S^T M_k
  double* norms;   // [B, col_blocks, 2]: per column block, sum of squares of its columns of M_0, M_1
};

// Grid: B * row_blocks * col_blocks CTAs (column block fastest, so the CTAs of an entry share its rows
// in L2), kThreads threads, gram_smem_bytes() of dynamic shared memory.
template <typename T, bool kRelu>
__global__ void __launch_bounds__(kThreads) energies_gram_kernel(const GramParams<T> P) {
  extern __shared__ double smem[];
  double* Ss = smem;                          // [kGramChunk][kGramRS]: S[n0 + k][R0 + i]
  double* Ms = smem + kGramChunk * kGramRS;   // [kGramChunk][kGramCS]: [S | M][n0 + k][C0 + j]
  __shared__ double red[kWarps];
  const EnergyOperands<T>& op = P.op;
  const int64_t cta = blockIdx.x;
  const int cb = int(cta % P.col_blocks), rb = int(cta / P.col_blocks % P.row_blocks);
  const int64_t b = cta / (int64_t(P.col_blocks) * P.row_blocks);
  const int R0 = rb * kGramRows, C0 = cb * kGramCols, p = op.p;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wr = warp >> 2, wc = warp & 3;

  // Bit 4 i + j: whether to compute the warp's tile (i, j): inside T, and not wholly above the diagonal
  // of S^T S.
  unsigned live = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int rt = R0 / 8 + wr * 4 + i, ct = C0 / 8 + wc * 4 + j;
      if (rt * 8 < p && ct * 8 < P.ld && !(ct * 8 + 8 <= p && rt < ct)) live |= 1u << (4 * i + j);
    }
  }
  double acc[4][4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = 0.0;

  // Each thread loads the same M column (threadIdx.x % kGramCols) of every chunk: its sum of squares
  // belongs to one block.
  const int my_col = C0 + int(threadIdx.x) % kGramCols - p;
  const int my_block = my_col >= 0 && op.m > 0 ? my_col / op.m : 0;
  double nrm = 0.0;
  for (int64_t n0 = 0; n0 < op.N; n0 += kGramChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kGramChunk * kGramRows; e += kThreads) {
      const int k = e / kGramRows, i = e % kGramRows;
      const int64_t n = n0 + k;
      Ss[k * kGramRS + i] = n < op.N ? op.template s<kRelu>(b, n, R0 + i) : 0.0;
    }
    for (int e = threadIdx.x; e < kGramChunk * kGramCols; e += kThreads) {
      const int k = e / kGramCols, j = e % kGramCols, c = C0 + j;
      const int64_t n = n0 + k;
      double v = 0.0;
      if (n < op.N) v = c < p ? op.template s<kRelu>(b, n, c) : op.mcol(b, n, c - p);
      Ms[k * kGramCS + j] = v;
      if (c >= p) nrm += v * v;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kGramChunk; ks += 4) {
      double a[4], bf[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ss[(ks + t) * kGramRS + (wr * 4 + i) * 8 + g];
#pragma unroll
      for (int j = 0; j < 4; ++j) bf[j] = Ms[(ks + t) * kGramCS + (wc * 4 + j) * 8 + g];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (live >> (4 * i + j) & 1u) mma_f64(acc[i][j], a[i], bf[j]);
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (!(live >> (4 * i + j) & 1u)) continue;
      const int r = R0 + (wr * 4 + i) * 8 + g;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = C0 + (wc * 4 + j) * 8 + 2 * t + e;
        if (r < p && c < P.ld) P.Tg[(b * p + r) * P.ld + c] = acc[i][j][e];
      }
    }
  }
  // Norms: the CTAs of row block 0 cover every column once.
  if (rb == 0) {
    for (int k = 0; k < 2; ++k) {
      const double s = block_sum(my_col >= 0 && my_block == k ? nrm : 0.0, red);
      if (threadIdx.x == 0) P.norms[(b * P.col_blocks + cb) * 2 + k] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Pass 2: per entry, gamma (given, or gamma0 * lambda_max certified from the Gram), (S^T S + gamma I)^{-1}
// by Gauss-Jordan in shared memory, Z = (S^T S + gamma I)^{-1} S^T M on the tensor cores, and the values.

struct SolveParams {
  const double* Tg;     // [B, p, ld] from pass 1
  const double* norms;  // [B, col_blocks, 2] from pass 1
  const double* rho;    // kEnergies: [B]; block 1 of T and its norm are divided by rho_b (D = dX / rho)
  const double* gamma;  // [B] given ridges, or nullptr for the policy gamma0 * lambda_max(S^T S)
  double gamma0;
  int64_t B;
  int p, m, blocks, ld, col_blocks;
  double* gamma_out;    // [B]
  double* Z;            // [B, p, m * blocks]
  double* values;       // [B, blocks]: ||M_k||^2_{K,gamma}, or the raw ||M_k||^2 where gamma = 0
  int* flags;           // [B]: kFlag* bits (0: the entry is done)
};

// Grid: B CTAs of kThreads threads, solve_smem_bytes(p) of dynamic shared memory; p <= kSolveMaxP.
// kRelu: S >= 0, so the Collatz-Wielandt bracket certifies lambda_max (the linear activation's policy
// is left to the fallback).
template <bool kRelu>
__global__ void __launch_bounds__(kThreads) energies_solve_kernel(const SolveParams P) {
  extern __shared__ double smem[];
  const int p = P.p, Pp = pad8(p), lda = solve_lda(p), mc = P.m * P.blocks;
  double* As = smem;                   // [Pp][lda]: the Gram, then (S^T S + gamma I)^{-1}; zero padded
  double* Rs = As + Pp * lda;          // [Pp][kSolveRS]: a chunk of S^T M columns
  double* v = Rs + Pp * kSolveRS;      // [Pp] power-iteration vector
  double* u = v + Pp;                  // [Pp]
  double* red = u + Pp;                // [4 * kWarps] reduction scratch
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const double* Tb = P.Tg + b * p * P.ld;
  const double inv_rho = P.blocks == 2 ? 1.0 / P.rho[b] : 1.0;

  int finite = 1;
  for (int e = threadIdx.x; e < Pp * lda; e += kThreads) {
    const int i = e / lda, j = e % lda;
    double a = 0.0;
    if (i < p && j < p) a = i >= j ? Tb[i * P.ld + j] : Tb[j * P.ld + i];
    finite &= (a - a == 0.0);  // false for NaN and +-inf
    As[e] = a;
  }
  double nrm[2] = {0.0, 0.0};
  for (int k = 0; k < P.blocks; ++k) {
    for (int c = 0; c < P.col_blocks; ++c) nrm[k] += P.norms[(b * P.col_blocks + c) * 2 + k];
  }
  nrm[1] *= inv_rho * inv_rho;
  if (!__syncthreads_and(finite)) {
    if (threadIdx.x == 0) P.flags[b] = kFlagNonFinite;
    return;
  }

  // gamma: given, or gamma0 * lambda_max by power iteration from v = 1. For S >= 0 the Gram is
  // nonnegative, and min_i (A v)_i / v_i <= lambda_max <= max_i (A v)_i / v_i over v_i > 0
  // (Collatz-Wielandt): iterate until that bracket is narrower than kPowerTol.
  double gam = 0.0;
  if (P.gamma != nullptr) {
    gam = P.gamma[b];
  } else if constexpr (!kRelu) {
    if (threadIdx.x == 0) P.flags[b] = kFlagGamma;
    return;
  } else {
    for (int i = threadIdx.x; i < Pp; i += kThreads) v[i] = i < p ? 1.0 : 0.0;
    __syncthreads();
    bool done = false;
    double lam = 0.0;
    for (int it = 0; it < kPowerMaxIters && !done; ++it) {
      for (int i = warp; i < p; i += kWarps) {
        double s = 0.0;
        for (int j = lane; j < p; j += 32) s += As[i * lda + j] * v[j];
        s = warp_sum_f64(s);
        if (lane == 0) u[i] = s;
      }
      __syncthreads();
      double lo = __longlong_as_double(0x7ff0000000000000LL), hi = 0.0, umax = 0.0;  // lo = +inf
      for (int i = threadIdx.x; i < p; i += kThreads) {
        if (v[i] > 0.0) {
          const double q = u[i] / v[i];
          lo = fmin(lo, q);
          hi = fmax(hi, q);
        }
        umax = fmax(umax, u[i]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        lo = fmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
        hi = fmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
        umax = fmax(umax, __shfl_xor_sync(0xffffffffu, umax, o));
      }
      if (lane == 0) red[warp] = lo, red[kWarps + warp] = hi, red[2 * kWarps + warp] = umax;
      __syncthreads();
      lo = red[0], hi = red[kWarps], umax = red[2 * kWarps];
      for (int i = 1; i < kWarps; ++i) {
        lo = fmin(lo, red[i]), hi = fmax(hi, red[kWarps + i]), umax = fmax(umax, red[2 * kWarps + i]);
      }
      if (hi <= 0.0) {  // S^T S = 0
        lam = 0.0, done = true;
      } else if (hi - lo <= kPowerTol * hi) {
        lam = 0.5 * (lo + hi), done = true;
      } else {
        for (int i = threadIdx.x; i < p; i += kThreads) v[i] = u[i] / umax;
      }
      __syncthreads();
    }
    if (!done) {
      if (threadIdx.x == 0) P.flags[b] = kFlagGamma;
      return;
    }
    gam = P.gamma0 * lam;
  }
  if (threadIdx.x == 0) P.gamma_out[b] = gam;
  double* Zb = P.Z + b * p * mc;
  if (gam == 0.0) {
    // gamma0 met S = 0 (bias=False): Z = 0 and the raw norms (the launcher maps them to 0 or +inf).
    for (int e = threadIdx.x; e < p * mc; e += kThreads) Zb[e] = 0.0;
    if (threadIdx.x == 0) {
      for (int k = 0; k < P.blocks; ++k) P.values[b * P.blocks + k] = nrm[k];
      P.flags[b] = 0;
    }
    return;
  }
  for (int i = threadIdx.x; i < p; i += kThreads) As[i * lda + i] += gam;
  __syncthreads();

  // In-place Gauss-Jordan inverse without pivoting (the pivots of an SPD matrix are positive).
  for (int k = 0; k < p; ++k) {
    const double piv = As[k * lda + k];
    if (!(piv > 0.0)) {  // the same value in every thread: the whole CTA leaves
      if (threadIdx.x == 0) P.flags[b] = kFlagSolve;
      return;
    }
    const double d = 1.0 / piv;
    for (int i = warp; i < p; i += kWarps) {
      if (i == k) continue;
      const double f = As[i * lda + k] * d;
      for (int j = lane; j < p; j += 32)
        if (j != k) As[i * lda + j] -= f * As[k * lda + j];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < p; j += kThreads) {
      if (j == k) continue;
      As[k * lda + j] *= d;
      As[j * lda + k] *= -d;
    }
    if (threadIdx.x == 0) As[k * lda + k] = d;
    __syncthreads();
  }

  // Z = A^{-1} R, kSolveCols columns of R = S^T M at a time. Output tiles: Pp / 8 rows x 4 columns;
  // warp w owns column tile w % 4 and row tiles w / 4, w / 4 + 2, ...
  double dot[2] = {0.0, 0.0};
  const int ct = warp & 3, rt0 = warp >> 2, RT = Pp / 8;
  for (int c0 = 0; c0 < mc; c0 += kSolveCols) {
    __syncthreads();
    for (int e = threadIdx.x; e < Pp * kSolveCols; e += kThreads) {
      const int k = e / kSolveCols, j = e % kSolveCols, c = c0 + j;
      double r = 0.0;
      if (k < p && c < mc) r = Tb[k * P.ld + p + c] * (c >= P.m ? inv_rho : 1.0);
      Rs[k * kSolveRS + j] = r;
    }
    __syncthreads();
    double acc[(kSolveMaxP / 8 + 1) / 2][2];
#pragma unroll
    for (int s = 0; s < (kSolveMaxP / 8 + 1) / 2; ++s) acc[s][0] = acc[s][1] = 0.0;
    for (int k0 = 0; k0 < Pp; k0 += 4) {
      const double bf = Rs[(k0 + t) * kSolveRS + ct * 8 + g];
#pragma unroll
      for (int s = 0; s < (kSolveMaxP / 8 + 1) / 2; ++s) {
        const int rt = rt0 + 2 * s;
        if (rt < RT) mma_f64(acc[s], As[(rt * 8 + g) * lda + k0 + t], bf);
      }
    }
#pragma unroll
    for (int s = 0; s < (kSolveMaxP / 8 + 1) / 2; ++s) {
      const int r = (rt0 + 2 * s) * 8 + g;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = ct * 8 + 2 * t + e, c = c0 + j;
        if (rt0 + 2 * s < RT && r < p && c < mc) {
          Zb[r * mc + c] = acc[s][e];
          dot[c >= P.m ? 1 : 0] += acc[s][e] * Rs[r * kSolveRS + j];
        }
      }
    }
  }
  // ||M_k||^2_{K,gamma} = (||M_k||^2 - <S^T M_k, Z_k>) / gamma; entries where that difference keeps
  // less than kCancelTol of ||M_k||^2 go to the residual form.
  int ok = 1;
  for (int k = 0; k < P.blocks; ++k) {
    const double dk = block_sum(dot[k], red);
    const double diff = nrm[k] - dk;
    ok &= diff >= kCancelTol * nrm[k];
    if (threadIdx.x == 0) P.values[b * P.blocks + k] = diff / gam;
  }
  if (threadIdx.x == 0) P.flags[b] = ok ? 0 : kFlagValue;
}

// ---------------------------------------------------------------------------------------------------
// Pass 3: gradients. With Q_k = 2 c_k (M_k - S Z_k) / gamma (c_k = dLoss/dvalue_k):
//   dM_k = Q_k, the metric term dX = -[sum_k Q_k Z_k^T][:, :w] * sigma'(X), and for the energies
//   (D = (X_{b+1} - X_b) / rho): dxs[b] += Q_0 - Q_1 / rho, dxs[b+1] += Q_1 / rho, drho = -<Q_1, D> / rho.

template <typename T>
struct BwdParams {
  EnergyOperands<T> op;
  const double* Z;      // [B, p, m * blocks]
  const double* gamma;  // [B]
  const double* coef;   // [B, blocks]
  const double* rho;    // kEnergies: [B]
  int64_t B;
  int nblocks;          // blocks to process: op.blocks, or 1 when the launcher proved block 1 contributes 0
  int row_chunks;       // ceil(N / (8 kRT))
  T* dX;                // [B, N, w]: dX (kCoi), the metric term (kKNorm), dxs[b]'s part from entry b (kEnergies)
  T* dM;                // kKNorm: [B, N, m]
  T* dnext;             // kEnergies with 2 blocks: [B, N, w], dxs[b+1]'s part from entry b
  double* drho;         // kEnergies with 2 blocks: [B, row_chunks] partial sums
};

// acc[rt][s] += A B over k < K (a multiple of 4) for the warp's tiles: row tiles rt < kRT and column tiles
// warp + 8 s below Cp columns. A (8 kRT x K) comes from shared memory with row stride `as`; B(k, c) is
// bval(k, c), read through L1 (0 outside the matrix).
template <int kRT, int kCTW, typename BVal>
__device__ __forceinline__ void warp_tile_gemm(double (&acc)[kRT][kCTW][2], const double* As, int as, int K, int Cp,
                                               const BVal& bval) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int k0 = 0; k0 < K; k0 += 4) {
    double a[kRT];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) a[rt] = As[(rt * 8 + g) * as + k0 + t];
#pragma unroll
    for (int s = 0; s < kCTW; ++s) {
      const int c0 = (warp + 8 * s) * 8;
      if (c0 >= Cp) break;
      const double bf = bval(k0 + t, c0 + g);
#pragma unroll
      for (int rt = 0; rt < kRT; ++rt) mma_f64(acc[rt][s], a[rt], bf);
    }
  }
}

// Grid: B * row_chunks CTAs (chunk fastest) of kThreads threads, bwd_smem_bytes(kRT, p, m) of dynamic
// shared memory; pad8(m), pad8(w) <= bwd_max_cols(kRT).
template <typename T, bool kRelu, int kRT>
__global__ void __launch_bounds__(kThreads) energies_bwd_kernel(const BwdParams<T> P) {
  constexpr int kRows = 8 * kRT, kCTW = kBwdMaxTiles / kRT;  // rows per CTA, column tiles per warp
  extern __shared__ double smem[];
  const EnergyOperands<T>& op = P.op;
  const int p = op.p, w = op.w, m = op.m, mc = m * op.blocks, Pp = pad8(p), Mp = pad8(m), Wp = pad8(w);
  const int RS = stride4(Pp), QS = stride4(Mp);
  double* Ss = smem;               // [kRows][RS]: S rows
  double* Qs = Ss + kRows * RS;    // [kRows][QS]: Q_k rows
  double* red = Qs + kRows * QS;   // [2 kWarps]
  const int64_t b = blockIdx.x / P.row_chunks;
  const int64_t r0 = int64_t(blockIdx.x % P.row_chunks) * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const double gam = P.gamma[b];
  const double* Zb = P.Z + b * p * mc;
  const double inv_rho = op.src == EnergySource::kEnergies ? 1.0 / P.rho[b] : 1.0;

  for (int e = threadIdx.x; e < kRows * RS; e += kThreads) {
    const int i = e / RS, j = e % RS;
    const int64_t n = r0 + i;
    Ss[e] = n < op.N && j < p ? op.template s<kRelu>(b, n, j) : 0.0;
  }
  // E: the part of dX besides the metric term, at this thread's fragment positions (row tile rt, column
  // tile warp + 8 s): Q_0 - Q_1 / rho; P: the metric term's sum over blocks.
  double E[kRT][kCTW][2], Pm[kRT][kCTW][2];
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
    for (int s = 0; s < kCTW; ++s) E[rt][s][0] = E[rt][s][1] = Pm[rt][s][0] = Pm[rt][s][1] = 0.0;
  double drho = 0.0;

  for (int k = 0; k < P.nblocks; ++k) {
    const double scale = gam != 0.0 ? 2.0 * P.coef[b * op.blocks + k] / gam : 0.0;
    const double* Zk = Zb + k * m;  // Z_k[i][c] = Zk[i * mc + c]
    __syncthreads();  // Ss written (k = 0) / Qs of the previous block consumed
    // R = S Z_k: A = Ss (rows x p), B = Z_k (p x m) read through L1.
    double acc[kRT][kCTW][2];
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt)
#pragma unroll
      for (int s = 0; s < kCTW; ++s) acc[rt][s][0] = acc[rt][s][1] = 0.0;
    warp_tile_gemm<kRT, kCTW>(acc, Ss, RS, Pp, Mp, [&](int kk, int c) {
      return kk < p && c < m ? Zk[int64_t(kk) * mc + c] : 0.0;
    });
    // Q = scale (M_k - R) into Qs; block 1 also gives dnext and drho; Q_0 - Q_1 / rho accumulates in E.
#pragma unroll
    for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
      for (int s = 0; s < kCTW; ++s) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = rt * 8 + g, c = (warp + 8 * s) * 8 + 2 * t + e;
          const int64_t n = r0 + i;
          if (c >= Mp) continue;
          double q = 0.0;
          if (n < op.N && c < m) {
            const double mv = op.mcol(b, n, k * m + c) * (k == 1 ? inv_rho : 1.0);  // M_k (block 1: D)
            q = scale * (mv - acc[rt][s][e]);
            const int64_t o = (b * op.N + n);
            if (op.src == EnergySource::kKNorm) P.dM[o * m + c] = T(q);
            if (k == 1) {
              P.dnext[o * w + c] = T(q * inv_rho);
              drho += q * mv;
              E[rt][s][e] -= q * inv_rho;
            } else if (op.src != EnergySource::kKNorm) {
              E[rt][s][e] += q;
            }
          }
          Qs[i * QS + c] = q;
        }
      }
    }
    __syncthreads();
    // Pm += Q Z_k[:w, :]^T: A = Qs (rows x m), B[c][j] = Z_k[j][c] (j < w).
    warp_tile_gemm<kRT, kCTW>(Pm, Qs, QS, Mp, Wp, [&](int kk, int j) {
      return j < w && kk < m ? Zk[int64_t(j) * mc + kk] : 0.0;
    });
  }

  // dX = E - Pm * sigma'(X) (relu: 0 where X <= 0, NaN passes).
#pragma unroll
  for (int rt = 0; rt < kRT; ++rt) {
#pragma unroll
    for (int s = 0; s < kCTW; ++s) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = rt * 8 + g, j = (warp + 8 * s) * 8 + 2 * t + e;
        const int64_t n = r0 + i;
        if (n >= op.N || j >= w) continue;
        const double metric = kRelu && op.x(b, n, j) <= 0.0 ? 0.0 : Pm[rt][s][e];
        P.dX[(b * op.N + n) * w + j] = T(E[rt][s][e] - metric);
      }
    }
  }
  if (P.nblocks == 2) {
    const double s = block_sum(drho, red);
    if (threadIdx.x == 0) P.drho[blockIdx.x] = -s * inv_rho;
  }
}

}  // namespace kernels
}  // namespace leakycuda
