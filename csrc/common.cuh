// Shared pieces of the odelta_fast CUDA kernels: input checks with clear messages, 16-byte vector
// loads, warp reductions.
//
// Only light torch headers are included (no torch/extension.h, no ATen/cuda/CUDAContext.h): they
// compile in a fraction of the time and need no cuBLAS/cuSPARSE headers, so CI can compile these
// files with nothing but nvcc and torch's own include directory.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace odelta {

// ------------------------------------------------------------------------------------ checks
// TORCH_CHECK_VALUE raises c10::ValueError, which Python sees as ValueError like the op layer's own
// checks. `cuda` is false in the Meta implementations: shapes and dtypes only.

inline void check_device(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": argument '", name, "' is on ", t.device(),
                    "; expected ", like.device(), " like the input");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": argument '", name,
                    "' has dtype ", s, "; expected float16, bfloat16 or float32");
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType expected) {
  TORCH_CHECK_VALUE(t.scalar_type() == expected, op, ": argument '", name, "' has dtype ", t.scalar_type(),
                    "; expected ", expected);
}

inline void check_ids(const at::Tensor& t, const char* op, int64_t rows) {
  const auto s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kInt || s == at::kLong, op, ": argument 'ids' has dtype ", s,
                    "; expected int32 or int64");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, op, ": argument 'ids' has shape ", t.sizes(),
                    "; expected (", rows, "), one id per row");
}

inline void check_shape(const at::Tensor& t, const char* op, const char* name, c10::IntArrayRef expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < expected.size(); ++i) {
      want += expected[i] < 0 ? std::string("*") : std::to_string(expected[i]);
      if (i + 1 < expected.size()) want += ", ";
    }
    want += ")";
    TORCH_CHECK_VALUE(false, op, ": argument '", name, "' has shape ", t.sizes(), "; expected ", want);
  }
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": argument '", name, "' must be contiguous (strides ", t.strides(),
                    " for shape ", t.sizes(), "); call .contiguous() first");
}

// Dispatch over exactly the dtypes check_float admits: no double instantiations compiled (and
// register-budgeted) for a dtype no caller can pass.
#define ODELTA_DISPATCH_FLOATS(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline unsigned int blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned int>((n + per_block - 1) / per_block);
}

// ------------------------------------------------------------------------------------ device helpers
// Elements per 16-byte access: 8 for fp16/bf16, 4 for fp32.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::kSize]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = static_cast<float>(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::kSize]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) e[i] = static_cast<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace odelta
