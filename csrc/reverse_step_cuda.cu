// CUDA kernels of ncp::reverse_step and ncp::reverse_step_backward.
//
// One launch per call. Blocks are (sample, slice) pairs, so a block reads its
// three coefficients once; each thread moves 16-byte vectors when the sample
// size and the pointers allow it (scalar path otherwise). x_t and z are read
// once for all branches.
#include "common.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace ncp {
namespace {

using cuda::kThreads;
using cuda::Pack;

template <typename T, int V, typename Acc>
__device__ __forceinline__ void step_branch(const Acc (&base)[V], Acc c_e, const T* eps, T* out) {
  const Pack<T, V> e = cuda::load<T, V>(eps);
  Pack<T, V> o;
#pragma unroll
  for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(base[j] - c_e * static_cast<Acc>(e.v[j]));
  cuda::store<T, V>(out, o);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    reverse_step_kernel(const T* __restrict__ x, const T* __restrict__ eps_p, const T* __restrict__ eps_o,
                        const T* __restrict__ z, const float* __restrict__ coef, T* __restrict__ out_p,
                        T* __restrict__ out_o, int64_t m, int64_t nm, int64_t k, int64_t blocks_per_sample) {
  using Acc = at::opmath_type<T>;
  const int64_t n = blockIdx.x / blocks_per_sample;
  const int64_t slice = blockIdx.x % blocks_per_sample;
  const Acc c_x = coef[3 * n], c_e = coef[3 * n + 1], sigma = coef[3 * n + 2];
  const int64_t stride = blocks_per_sample * kThreads * V;
  for (int64_t i = (slice * kThreads + threadIdx.x) * V; i < m; i += stride) {
    const int64_t off = n * m + i;
    const Pack<T, V> xv = cuda::load<T, V>(x + off);
    const Pack<T, V> zv = cuda::load<T, V>(z + off);
    Acc base[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      base[j] = c_x * static_cast<Acc>(xv.v[j]) + sigma * static_cast<Acc>(zv.v[j]);
    }
    step_branch<T, V>(base, c_e, eps_p + off, out_p + off);
    for (int64_t b = 0; b < k; ++b) step_branch<T, V>(base, c_e, eps_o + b * nm + off, out_o + b * nm + off);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    reverse_step_backward_kernel(const T* __restrict__ grad, const float* __restrict__ coef, T* __restrict__ out,
                                 int64_t m, int64_t blocks_per_sample) {
  using Acc = at::opmath_type<T>;
  const int64_t n = blockIdx.x / blocks_per_sample;
  const int64_t slice = blockIdx.x % blocks_per_sample;
  const Acc neg_c_e = -static_cast<Acc>(coef[3 * n + 1]);
  const int64_t stride = blocks_per_sample * kThreads * V;
  for (int64_t i = (slice * kThreads + threadIdx.x) * V; i < m; i += stride) {
    const Pack<T, V> g = cuda::load<T, V>(grad + n * m + i);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(neg_c_e * static_cast<Acc>(g.v[j]));
    cuda::store<T, V>(out + n * m + i, o);
  }
}

// Blocks per sample: enough to fill the GPU (~8 blocks per SM), no more than the work.
int64_t blocks_per_sample(int64_t n, int64_t m, int vec) {
  const int64_t sms = cuda::sm_count();
  const int64_t needed = (m + kThreads * vec - 1) / (kThreads * vec);
  const int64_t fill = (8 * sms + n - 1) / n;
  return std::max<int64_t>(1, std::min(needed, fill));
}

std::tuple<at::Tensor, at::Tensor> reverse_step_cuda(const at::Tensor& x_t, const at::Tensor& eps_policy,
                                                     const at::Tensor& eps_other, const at::Tensor& z,
                                                     const at::Tensor& coef) {
  const c10::cuda::OptionalCUDAGuard guard(x_t.device());
  const ReverseStepArgs a = prepare_reverse_step(x_t, eps_policy, eps_other, z, coef);
  at::Tensor prev_policy = at::empty(a.x.sizes(), a.x.options().memory_format(a.fmt));
  at::Tensor prev_other = empty_stack(a.k, a.x, a.fmt);
  if (a.n * a.m == 0) return {prev_policy, prev_other};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "reverse_step_cuda", [&] {
    const scalar_t* ptrs[] = {a.x.const_data_ptr<scalar_t>(), a.eps_policy.const_data_ptr<scalar_t>(),
                              a.eps_other.const_data_ptr<scalar_t>(), a.z.const_data_ptr<scalar_t>()};
    scalar_t* out_p = prev_policy.mutable_data_ptr<scalar_t>();
    scalar_t* out_o = prev_other.mutable_data_ptr<scalar_t>();
    constexpr int V = cuda::kVec<scalar_t>;
    bool vec = a.m % V == 0 && cuda::aligned16(out_p) && cuda::aligned16(out_o);
    for (const scalar_t* p : ptrs) vec = vec && cuda::aligned16(p);
    const float* c = a.coef.const_data_ptr<float>();
    const int64_t bps = blocks_per_sample(a.n, a.m, vec ? V : 1);
    if (vec) {
      reverse_step_kernel<scalar_t, V><<<a.n * bps, kThreads, 0, stream>>>(
          ptrs[0], ptrs[1], ptrs[2], ptrs[3], c, out_p, out_o, a.m, a.n * a.m, a.k, bps);
    } else {
      reverse_step_kernel<scalar_t, 1><<<a.n * bps, kThreads, 0, stream>>>(
          ptrs[0], ptrs[1], ptrs[2], ptrs[3], c, out_p, out_o, a.m, a.n * a.m, a.k, bps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {prev_policy, prev_other};
}

at::Tensor reverse_step_backward_cuda(const at::Tensor& grad_prev_policy, const at::Tensor& coef) {
  const c10::cuda::OptionalCUDAGuard guard(grad_prev_policy.device());
  const auto prepared = prepare_reverse_step_backward(grad_prev_policy, coef);
  const at::Tensor& grad = prepared.first;  // (no structured binding: lambdas capture it only in C++20)
  const at::Tensor& c = prepared.second;
  at::Tensor out = at::empty(grad.sizes(), grad.options().memory_format(kernel_format(grad)));
  const int64_t n = grad.size(0);
  const int64_t m = n == 0 ? 0 : grad.numel() / n;
  if (n * m == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "reverse_step_backward_cuda", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    constexpr int V = cuda::kVec<scalar_t>;
    const bool vec = m % V == 0 && cuda::aligned16(g) && cuda::aligned16(o);
    const int64_t bps = blocks_per_sample(n, m, vec ? V : 1);
    const float* cf = c.const_data_ptr<float>();
    if (vec) {
      reverse_step_backward_kernel<scalar_t, V><<<n * bps, kThreads, 0, stream>>>(g, cf, o, m, bps);
    } else {
      reverse_step_backward_kernel<scalar_t, 1><<<n * bps, kThreads, 0, stream>>>(g, cf, o, m, bps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ncp, CUDA, m) {
  m.impl("reverse_step", &reverse_step_cuda);
  m.impl("reverse_step_backward", &reverse_step_backward_cuda);
}

}  // namespace ncp
