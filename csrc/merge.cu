// In-place LoRA merge / unmerge: W += alpha * B A (alpha = +/- scaling), fp32 accumulation, one
// rounding per element, one pass over W.
//
//   lora_merge_(weight (N, K) or (K, N) if fan_in_fan_out, lora_a (R, K), lora_b (N, R), alpha, fan_in_fan_out)
//
// Written as W (P, Q) += alpha * L (P, R) @ U (R, Q) with strided L and U: for an (N, K) weight
// L = B and U = A; for GPT-2's Conv1D (K, N) weight L = A^T and U = B^T (strides swapped, no copy).
//
// The pass is memory-bound (read and write W once); each block stages a 32 x (32 * V) tile's
// factors in shared memory as fp32 and every thread owns 4 rows x V columns (V = one 16-byte
// vector), so each staged value feeds several FMAs: at rank 16 shared-memory traffic stays under
// what the SMs can serve while W streams from HBM. The thread's W vectors are loaded before the
// rank loop so the HBM latency overlaps the arithmetic.
//
// Occupancy (nvcc --resource-usage, checked in CI by tests/test_csrc_compile.py): the vectorized
// 16-bit kernels need 104-106 registers unconstrained, so two 256-thread blocks fit per SM
// (65536 / (256 * 112) = 2.3), and __launch_bounds__(256, kMinBlocks = 2) keeps it that way with
// no spills (up to 128 registers). Three blocks would need <= 85 registers: ptxas then spills
// 32-48 bytes per thread, so two it is.
#include "common.cuh"

namespace odelta {
namespace {

constexpr int kThreadsX = 32;                    // threads along Q, one 16-byte vector each
constexpr int kThreadsY = 8;                     // threads along P
constexpr int kRowsPerThread = 4;                // rows of W per thread
constexpr int kTileP = kThreadsY * kRowsPerThread;  // 32 rows per block
constexpr int kRankChunk = 32;                   // ranks staged in shared memory at a time
constexpr int kMinBlocks = 2;                    // resident blocks per SM (see the occupancy note)

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kThreadsX * kThreadsY, kMinBlocks)
    lora_merge_kernel(T* __restrict__ w, const T* __restrict__ l, const T* __restrict__ u, int64_t P, int64_t Q,
                      int64_t R, int64_t stride_lp, int64_t stride_lr, int64_t stride_ur, int64_t stride_uq,
                      float alpha) {
  constexpr int V = Vec<T>::kSize;
  constexpr int kTileQ = kThreadsX * V;
  __shared__ float s_u[kRankChunk][kTileQ];
  __shared__ float s_l[kTileP][kRankChunk + 1];  // +1: no bank conflicts on the transposed fill

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTileP;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int64_t q = q0 + static_cast<int64_t>(tx) * V;
  const bool full_vector = kVectorized && q + V <= Q;

  // Prefetched as raw 16-byte vectors (4 registers each, not V floats): the loads are in flight
  // while the rank loop runs. Partial vectors at the right edge are read in the epilogue instead.
  uint4 w_raw[kRowsPerThread];
  if (full_vector) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t p = p0 + ty + i * kThreadsY;
      if (p < P) w_raw[i] = *reinterpret_cast<const uint4*>(w + p * Q + q);
    }
  }

  float acc[kRowsPerThread][V];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < V; ++j) acc[i][j] = 0.f;

  for (int64_t r0 = 0; r0 < R; r0 += kRankChunk) {
    for (int idx = tid; idx < kRankChunk * kTileQ; idx += kThreadsX * kThreadsY) {
      const int rr = idx / kTileQ, qq = idx % kTileQ;
      const int64_t r = r0 + rr, qg = q0 + qq;
      s_u[rr][qq] = (r < R && qg < Q) ? static_cast<float>(u[r * stride_ur + qg * stride_uq]) : 0.f;
    }
    for (int idx = tid; idx < kTileP * kRankChunk; idx += kThreadsX * kThreadsY) {
      const int pp = idx / kRankChunk, rr = idx % kRankChunk;
      const int64_t p = p0 + pp, r = r0 + rr;
      s_l[pp][rr] = (p < P && r < R) ? static_cast<float>(l[p * stride_lp + r * stride_lr]) : 0.f;
    }
    __syncthreads();
    const int rc = static_cast<int>(R - r0 < kRankChunk ? R - r0 : kRankChunk);
    for (int rr = 0; rr < rc; ++rr) {
      float uv[V];
#pragma unroll
      for (int j = 0; j < V; ++j) uv[j] = s_u[rr][tx * V + j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float lv = s_l[ty + i * kThreadsY][rr];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][j] = fmaf(lv, uv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t p = p0 + ty + i * kThreadsY;
    if (p >= P) continue;
    float out[V];
    if (full_vector) {
      const T* old = reinterpret_cast<const T*>(&w_raw[i]);
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = fmaf(alpha, acc[i][j], static_cast<float>(old[j]));
      store_vec(w + p * Q + q, out);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (q + j < Q) w[p * Q + q + j] = static_cast<T>(fmaf(alpha, acc[i][j], static_cast<float>(w[p * Q + q + j])));
    }
  }
}

void check_merge(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, bool fan_in_fan_out,
                 bool cuda) {
  constexpr const char* op = "odelta_fast_cuda::lora_merge_";
  check_float(weight, op, "weight");
  check_shape(weight, op, "weight", {-1, -1});
  const int64_t n = fan_in_fan_out ? weight.size(1) : weight.size(0);
  const int64_t k = fan_in_fan_out ? weight.size(0) : weight.size(1);
  check_shape(a, op, "lora_a", {-1, k});
  check_shape(b, op, "lora_b", {n, a.size(0)});
  check_dtype(a, op, "lora_a", weight.scalar_type());
  check_dtype(b, op, "lora_b", weight.scalar_type());
  if (cuda) {
    check_device(weight, op, "weight", weight);
    check_device(a, op, "lora_a", weight);
    check_device(b, op, "lora_b", weight);
    // The factors are read through their strides; only W is walked with vector accesses.
    check_contiguous(weight, op, "weight");
  }
}

void lora_merge_cuda(at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double alpha,
                     bool fan_in_fan_out) {
  check_merge(weight, a, b, fan_in_fan_out, /*cuda=*/true);
  const int64_t P = weight.size(0), Q = weight.size(1), R = a.size(0);
  if (P == 0 || Q == 0 || R == 0) return;
  // (N, K) weight: L = B (N, R), U = A (R, K). (K, N) weight: L = A^T (K, R), U = B^T (R, N).
  const int64_t stride_lp = fan_in_fan_out ? a.stride(1) : b.stride(0);
  const int64_t stride_lr = fan_in_fan_out ? a.stride(0) : b.stride(1);
  const int64_t stride_ur = fan_in_fan_out ? b.stride(1) : a.stride(0);
  const int64_t stride_uq = fan_in_fan_out ? b.stride(0) : a.stride(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ODELTA_DISPATCH_FLOATS(weight.scalar_type(), "lora_merge_", [&] {
    constexpr int V = Vec<scalar_t>::kSize;
    auto* wp = static_cast<scalar_t*>(weight.mutable_data_ptr());
    const auto* lp = static_cast<const scalar_t*>(fan_in_fan_out ? a.const_data_ptr() : b.const_data_ptr());
    const auto* up = static_cast<const scalar_t*>(fan_in_fan_out ? b.const_data_ptr() : a.const_data_ptr());
    const dim3 grid(blocks_for(Q, kThreadsX * V), blocks_for(P, kTileP));
    const dim3 block(kThreadsX, kThreadsY);
    TORCH_CHECK_VALUE(grid.y <= 65535, "odelta_fast_cuda::lora_merge_: weight has ", P,
                      " rows; at most ", 65535LL * kTileP, " supported");
    const bool vec = Q % V == 0 && aligned16(wp);
    if (vec) {
      lora_merge_kernel<scalar_t, true><<<grid, block, 0, stream>>>(wp, lp, up, P, Q, R, stride_lp, stride_lr,
                                                                    stride_ur, stride_uq, static_cast<float>(alpha));
    } else {
      lora_merge_kernel<scalar_t, false><<<grid, block, 0, stream>>>(wp, lp, up, P, Q, R, stride_lp, stride_lr,
                                                                     stride_ur, stride_uq, static_cast<float>(alpha));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void lora_merge_meta(at::Tensor& weight, const at::Tensor& a, const at::Tensor& b, double alpha,
                     bool fan_in_fan_out) {
  check_merge(weight, a, b, fan_in_fan_out, /*cuda=*/false);
}

}  // namespace
}  // namespace odelta

TORCH_LIBRARY_FRAGMENT(odelta_fast_cuda, m) {
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float alpha, bool fan_in_fan_out) -> ()");
}

TORCH_LIBRARY_IMPL(odelta_fast_cuda, CUDA, m) { m.impl("lora_merge_", &odelta::lora_merge_cuda); }

TORCH_LIBRARY_IMPL(odelta_fast_cuda, Meta, m) { m.impl("lora_merge_", &odelta::lora_merge_meta); }
