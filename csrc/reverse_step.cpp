// CPU kernels of ncp::reverse_step and ncp::reverse_step_backward.
//
// prev = c_x * x_t - c_e * eps + sigma * z for the policy branch and each of the
// K no-grad branches, in one pass over x_t and z (fp32 arithmetic, fp64 for fp64).
#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace ncp {
namespace {

constexpr int64_t kChunk = 4096;  // elements per work item: x_t and z stay in L1/L2

// out[i] = base[i] - c_e * eps[i]; a plain loop the compiler vectorizes.
template <typename T, typename Acc>
__attribute__((always_inline)) inline void subtract_scaled(const Acc* __restrict__ base, const T* __restrict__ eps,
                                                           Acc c_e, T* __restrict__ out, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    out[i] = static_cast<T>(base[i] - c_e * static_cast<Acc>(eps[i]));
  }
}

// base = c_x * x + sigma * z (the part shared by all branches).
template <typename T, typename Acc>
__attribute__((always_inline)) inline void combine(const T* __restrict__ x, const T* __restrict__ z, Acc c_x,
                                                   Acc sigma, Acc* __restrict__ base, int64_t len) {
  for (int64_t i = 0; i < len; ++i) base[i] = c_x * static_cast<Acc>(x[i]) + sigma * static_cast<Acc>(z[i]);
}

// out = scale * grad.
template <typename T, typename Acc>
__attribute__((always_inline)) inline void scale(const T* __restrict__ grad, Acc s, T* __restrict__ out,
                                                 int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<T>(s * static_cast<Acc>(grad[i]));
}

template <typename T>
void reverse_step_cpu_kernel(const ReverseStepArgs& a, T* prev_policy, T* prev_other) {
  using Acc = at::opmath_type<T>;
  const T* x = a.x.const_data_ptr<T>();
  const T* z = a.z.const_data_ptr<T>();
  const T* eps_p = a.eps_policy.const_data_ptr<T>();
  const T* eps_o = a.eps_other.const_data_ptr<T>();
  const float* coef = a.coef.const_data_ptr<float>();
  const int64_t chunks = (a.m + kChunk - 1) / kChunk;
  const int64_t nm = a.n * a.m;
  at::parallel_for(0, a.n * chunks, 8, [&](int64_t begin, int64_t end) {
    Acc base[kChunk];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks;
      const int64_t lo = n * a.m + (item % chunks) * kChunk;
      const int64_t len = std::min(kChunk, (n + 1) * a.m - lo);
      const Acc c_x = coef[3 * n], c_e = coef[3 * n + 1], sigma = coef[3 * n + 2];
      combine(x + lo, z + lo, c_x, sigma, base, len);
      subtract_scaled(base, eps_p + lo, c_e, prev_policy + lo, len);
      for (int64_t k = 0; k < a.k; ++k) {
        subtract_scaled(base, eps_o + k * nm + lo, c_e, prev_other + k * nm + lo, len);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> reverse_step_cpu(const at::Tensor& x_t,
                                                    const at::Tensor& eps_policy,
                                                    const at::Tensor& eps_other,
                                                    const at::Tensor& z, const at::Tensor& coef) {
  const ReverseStepArgs a = prepare_reverse_step(x_t, eps_policy, eps_other, z, coef);
  at::Tensor prev_policy = at::empty(a.x.sizes(), a.x.options().memory_format(a.fmt));
  at::Tensor prev_other = empty_stack(a.k, a.x, a.fmt);
  if (a.n * a.m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "reverse_step_cpu", [&] {
      reverse_step_cpu_kernel<scalar_t>(a, prev_policy.mutable_data_ptr<scalar_t>(),
                                        prev_other.mutable_data_ptr<scalar_t>());
    });
  }
  return {prev_policy, prev_other};
}

template <typename T>
void reverse_step_backward_cpu_kernel(const T* grad, const float* coef, T* out, int64_t n_count,
                                      int64_t m) {
  using Acc = at::opmath_type<T>;
  const int64_t chunks = (m + kChunk - 1) / kChunk;
  at::parallel_for(0, n_count * chunks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks;
      const int64_t lo = n * m + (item % chunks) * kChunk;
      const int64_t len = std::min(kChunk, (n + 1) * m - lo);
      scale(grad + lo, -static_cast<Acc>(coef[3 * n + 1]), out + lo, len);
    }
  });
}

at::Tensor reverse_step_backward_cpu(const at::Tensor& grad_prev_policy, const at::Tensor& coef) {
  const auto prepared = prepare_reverse_step_backward(grad_prev_policy, coef);
  const at::Tensor& grad = prepared.first;  // (no structured binding: lambdas capture it only in C++20)
  const at::Tensor& c = prepared.second;
  at::Tensor out = at::empty(grad.sizes(), grad.options().memory_format(kernel_format(grad)));
  const int64_t n = grad.size(0);
  const int64_t m = n == 0 ? 0 : grad.numel() / n;
  if (n * m > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "reverse_step_backward_cpu", [&] {
      reverse_step_backward_cpu_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(),
                                                 c.const_data_ptr<float>(),
                                                 out.mutable_data_ptr<scalar_t>(), n, m);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ncp, CPU, m) {
  m.impl("reverse_step", &reverse_step_cpu);
  m.impl("reverse_step_backward", &reverse_step_backward_cpu);
}

}  // namespace ncp
