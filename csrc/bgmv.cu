// Batched gather matrix-vector products for multi-delta LoRA decode (BGMV, as in Punica/S-LoRA):
// every row i of the batch (one token per sequence) uses its own delta d = ids[i].
//
//   bgmv_shrink(x (M, K), stacked_a (D, R, K), ids (M)) -> t (M, R) float32,  t[i] = x[i] A[d]^T
//   bgmv_expand_(y (M, N), t (M, R) f32, stacked_b (D, N, R), ids (M), scalings (D) f32)
//                                           y[i] += scalings[d] * t[i] B[d]^T   (in place)
//
// Ids outside [0, D) (-1: backbone only) select no delta: t[i] = 0, y[i] untouched, and they are
// never used as an address. Accumulation is fp32; y is rounded once.
#include "common.cuh"

namespace odelta {
namespace {

constexpr int kShrinkWarps = 8;      // ranks per shrink block: one warp per (row, rank)
constexpr int kExpandThreads = 256;  // output columns per expand block
// The expand keeps t[i] in shared memory as fp32: 48 KB of default shared memory holds R <= 12288;
// ranks beyond a few hundred are not LoRA any more, so the limit is generous.
constexpr int64_t kMaxRank = 8192;
// gridDim.y is limited to 65535; larger batches loop over rows inside the expand kernel.
constexpr int64_t kMaxGridY = 65535;
// Resident blocks per SM both kernels are built for (at most 64 registers per thread): they use
// 28-64 (nvcc --resource-usage, checked in CI by tests/test_csrc_compile.py; the fp32 vectorized
// expand takes the whole 64), so four 256-thread blocks -- half the SM's threads -- stay resident
// to hide the latency of their streaming loads.
constexpr int kMinBlocks = 4;

// One warp computes one t[i, r]: a K-long dot product with 16-byte loads when rows are aligned.
template <typename T, typename IdT, bool kVectorized>
__global__ void __launch_bounds__(kShrinkWarps * 32, kMinBlocks)
    bgmv_shrink_kernel(const T* __restrict__ x, const T* __restrict__ a, const IdT* __restrict__ ids,
                       float* __restrict__ t, int64_t D, int64_t R, int64_t K) {
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + threadIdx.x / 32;
  if (r >= R) return;
  const int64_t d = static_cast<int64_t>(ids[row]);
  float acc = 0.f;
  if (d >= 0 && d < D) {
    const T* xr = x + row * K;
    const T* ar = a + (d * R + r) * K;
    if constexpr (kVectorized) {
      constexpr int V = Vec<T>::kSize;
      for (int64_t k = static_cast<int64_t>(lane) * V; k < K; k += 32 * V) {
        float xv[V], av[V];
        load_vec(xr + k, xv);
        load_vec(ar + k, av);
#pragma unroll
        for (int j = 0; j < V; ++j) acc = fmaf(xv[j], av[j], acc);
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) acc = fmaf(static_cast<float>(xr[k]), static_cast<float>(ar[k]), acc);
    }
    acc = warp_sum(acc);
  }
  if (lane == 0) t[row * R + r] = acc;
}

// One thread computes one y[i, n]: an R-long dot product of t[i] (shared memory) and B[d, n, :]
// (contiguous, 16-byte loads when aligned); a warp reads 32 consecutive rows of B, coalesced.
template <typename T, typename IdT, bool kVectorized>
__global__ void __launch_bounds__(kExpandThreads, kMinBlocks)
    bgmv_expand_kernel(T* __restrict__ y, const float* __restrict__ t, const T* __restrict__ b,
                       const IdT* __restrict__ ids, const float* __restrict__ scalings, int64_t M, int64_t D,
                       int64_t N, int64_t R) {
  extern __shared__ float t_row[];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kExpandThreads + threadIdx.x;
  for (int64_t row = blockIdx.y; row < M; row += gridDim.y) {
    const int64_t d = static_cast<int64_t>(ids[row]);
    // Uniform across the block: every thread skips the row, so the barriers below stay matched.
    if (d < 0 || d >= D) continue;
    __syncthreads();  // the previous row's readers are done with t_row
    for (int64_t r = threadIdx.x; r < R; r += kExpandThreads) t_row[r] = t[row * R + r];
    __syncthreads();
    if (n >= N) continue;
    const T* br = b + (d * N + n) * R;
    float acc = 0.f;
    if constexpr (kVectorized) {
      constexpr int V = Vec<T>::kSize;
      // Four vectors in flight per thread: unrolled further (as the register budget of the launch
      // bounds invites), ptxas spills the fp32 variant.
#pragma unroll 4
      for (int64_t r = 0; r < R; r += V) {
        float bv[V];
        load_vec(br + r, bv);
#pragma unroll
        for (int j = 0; j < V; ++j) acc = fmaf(bv[j], t_row[r + j], acc);
      }
    } else {
      for (int64_t r = 0; r < R; ++r) acc = fmaf(static_cast<float>(br[r]), t_row[r], acc);
    }
    T* yp = y + row * N + n;
    *yp = static_cast<T>(fmaf(scalings[d], acc, static_cast<float>(*yp)));
  }
}

// ------------------------------------------------------------------------------------ checks
void check_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ids, bool cuda) {
  constexpr const char* op = "odelta_fast_cuda::bgmv_shrink";
  check_float(x, op, "x");
  check_shape(x, op, "x", {-1, -1});
  check_shape(a, op, "stacked_a", {-1, -1, x.size(1)});
  check_dtype(a, op, "stacked_a", x.scalar_type());
  check_ids(ids, op, x.size(0));
  if (cuda) {
    check_device(x, op, "x", x);
    check_device(a, op, "stacked_a", x);
    check_device(ids, op, "ids", x);
    check_contiguous(x, op, "x");
    check_contiguous(a, op, "stacked_a");
    check_contiguous(ids, op, "ids");
  }
}

void check_expand(const at::Tensor& y, const at::Tensor& t, const at::Tensor& b, const at::Tensor& ids,
                  const at::Tensor& scalings, bool cuda) {
  constexpr const char* op = "odelta_fast_cuda::bgmv_expand_";
  check_float(y, op, "y");
  check_shape(y, op, "y", {-1, -1});
  check_shape(b, op, "stacked_b", {-1, y.size(1), -1});
  check_dtype(b, op, "stacked_b", y.scalar_type());
  check_shape(t, op, "t", {y.size(0), b.size(2)});
  check_dtype(t, op, "t", at::kFloat);
  check_shape(scalings, op, "scalings", {b.size(0)});
  check_dtype(scalings, op, "scalings", at::kFloat);
  check_ids(ids, op, y.size(0));
  TORCH_CHECK_VALUE(b.size(2) <= kMaxRank, op, ": rank ", b.size(2), " exceeds the supported ", kMaxRank);
  if (cuda) {
    for (auto [name, tensor] : {std::pair<const char*, const at::Tensor*>{"y", &y}, {"t", &t},
                                {"stacked_b", &b}, {"ids", &ids}, {"scalings", &scalings}}) {
      check_device(*tensor, op, name, y);
      check_contiguous(*tensor, op, name);
    }
  }
}

template <typename Fn>
void dispatch_ids(const at::Tensor& ids, Fn&& fn) {
  if (ids.scalar_type() == at::kInt) {
    fn(static_cast<const int32_t*>(ids.const_data_ptr()));
  } else {
    fn(static_cast<const int64_t*>(ids.const_data_ptr()));
  }
}

// ------------------------------------------------------------------------------------ CUDA
at::Tensor bgmv_shrink_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ids) {
  check_shrink(x, a, ids, /*cuda=*/true);
  const int64_t M = x.size(0), K = x.size(1), D = a.size(0), R = a.size(1);
  at::Tensor t = x.new_empty({M, R}, x.options().dtype(at::kFloat));
  if (M == 0 || R == 0) return t;
  if (K == 0 || D == 0) return t.zero_();
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(M), blocks_for(R, kShrinkWarps));
  ODELTA_DISPATCH_FLOATS(x.scalar_type(), "bgmv_shrink", [&] {
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    const auto* ap = static_cast<const scalar_t*>(a.const_data_ptr());
    // 16-byte loads need every row start aligned: K a multiple of the vector width, aligned bases.
    const bool vec = K % Vec<scalar_t>::kSize == 0 && aligned16(xp) && aligned16(ap);
    dispatch_ids(ids, [&](auto* idp) {
      using IdT = std::remove_cv_t<std::remove_pointer_t<decltype(idp)>>;
      if (vec) {
        bgmv_shrink_kernel<scalar_t, IdT, true><<<grid, kShrinkWarps * 32, 0, stream>>>(
            xp, ap, idp, t.mutable_data_ptr<float>(), D, R, K);
      } else {
        bgmv_shrink_kernel<scalar_t, IdT, false><<<grid, kShrinkWarps * 32, 0, stream>>>(
            xp, ap, idp, t.mutable_data_ptr<float>(), D, R, K);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return t;
}

void bgmv_expand_cuda(at::Tensor& y, const at::Tensor& t, const at::Tensor& b, const at::Tensor& ids,
                      const at::Tensor& scalings) {
  check_expand(y, t, b, ids, scalings, /*cuda=*/true);
  const int64_t M = y.size(0), N = y.size(1), D = b.size(0), R = b.size(2);
  if (M == 0 || N == 0 || R == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks_for(N, kExpandThreads), static_cast<unsigned int>(std::min(M, kMaxGridY)));
  const size_t smem = static_cast<size_t>(R) * sizeof(float);
  ODELTA_DISPATCH_FLOATS(y.scalar_type(), "bgmv_expand_", [&] {
    auto* yp = static_cast<scalar_t*>(y.mutable_data_ptr());
    const auto* bp = static_cast<const scalar_t*>(b.const_data_ptr());
    const bool vec = R % Vec<scalar_t>::kSize == 0 && aligned16(bp);
    dispatch_ids(ids, [&](auto* idp) {
      using IdT = std::remove_cv_t<std::remove_pointer_t<decltype(idp)>>;
      if (vec) {
        bgmv_expand_kernel<scalar_t, IdT, true><<<grid, kExpandThreads, smem, stream>>>(
            yp, t.const_data_ptr<float>(), bp, idp, scalings.const_data_ptr<float>(), M, D, N, R);
      } else {
        bgmv_expand_kernel<scalar_t, IdT, false><<<grid, kExpandThreads, smem, stream>>>(
            yp, t.const_data_ptr<float>(), bp, idp, scalings.const_data_ptr<float>(), M, D, N, R);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ------------------------------------------------------------------------------------ Meta
at::Tensor bgmv_shrink_meta(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ids) {
  check_shrink(x, a, ids, /*cuda=*/false);
  return x.new_empty({x.size(0), a.size(1)}, x.options().dtype(at::kFloat));
}

void bgmv_expand_meta(at::Tensor& y, const at::Tensor& t, const at::Tensor& b, const at::Tensor& ids,
                      const at::Tensor& scalings) {
  check_expand(y, t, b, ids, scalings, /*cuda=*/false);
}

}  // namespace
}  // namespace odelta

// A fragment, not TORCH_LIBRARY: each .cu file registers its own ops into the namespace.
TORCH_LIBRARY_FRAGMENT(odelta_fast_cuda, m) {
  m.def("bgmv_shrink(Tensor x, Tensor stacked_a, Tensor ids) -> Tensor");
  m.def("bgmv_expand_(Tensor(a!) y, Tensor t, Tensor stacked_b, Tensor ids, Tensor scalings) -> ()");
}

TORCH_LIBRARY_IMPL(odelta_fast_cuda, CUDA, m) {
  m.impl("bgmv_shrink", &odelta::bgmv_shrink_cuda);
  m.impl("bgmv_expand_", &odelta::bgmv_expand_cuda);
}

TORCH_LIBRARY_IMPL(odelta_fast_cuda, Meta, m) {
  m.impl("bgmv_shrink", &odelta::bgmv_shrink_meta);
  m.impl("bgmv_expand_", &odelta::bgmv_expand_meta);
}
