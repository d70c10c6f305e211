// CPU kernels of ncp::reverse_step and ncp::reverse_step_backward.
//
// prev = c_x * x_t - c_e * eps + sigma * z for the policy branch and each of the
// K no-grad branches, in one pass over x_t and z (fp32 arithmetic, fp64 for fp64).
#include "common.h"
#include "cpu_convert.h"

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
    out[i] = cpu::from_acc<T>(base[i] - c_e * cpu::to_acc(eps[i]));
  }
}

// base = c_x * x + sigma * z (the part shared by all branches).
template <typename T, typename Acc>
__attribute__((always_inline)) inline void combine(const T* __restrict__ x, const T* __restrict__ z, Acc c_x,
                                                   Acc sigma, Acc* __restrict__ base, int64_t len) {
  for (int64_t i = 0; i < len; ++i) base[i] = c_x * cpu::to_acc(x[i]) + sigma * cpu::to_acc(z[i]);
}

// out = scale * grad.
template <typename T, typename Acc>
__attribute__((always_inline)) inline void scale(const T* __restrict__ grad, Acc s, T* __restrict__ out,
                                                 int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] = cpu::from_acc<T>(s * cpu::to_acc(grad[i]));
}

// One chunk of samples' elements: prev = base - c_e * eps for the policy and the k other branches.
template <typename T>
NCP_CPU_CLONES void reverse_step_chunk(const T* x, const T* z, const T* eps_p, const T* eps_o, int64_t stride_o,
                                       int64_t k, const at::opmath_type<T> (&c)[3], T* out_p, T* out_o,
                                       int64_t len) {
  at::opmath_type<T> base[kChunk];
  combine(x, z, c[0], c[2], base, len);
  subtract_scaled(base, eps_p, c[1], out_p, len);
  for (int64_t b = 0; b < k; ++b) subtract_scaled(base, eps_o + b * stride_o, c[1], out_o + b * stride_o, len);
}

template <typename T>
NCP_CPU_CLONES void scale_chunk(const T* grad, at::opmath_type<T> s, T* out, int64_t len) {
  scale(grad, s, out, len);
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
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks;
      const int64_t lo = n * a.m + (item % chunks) * kChunk;
      const int64_t len = std::min(kChunk, (n + 1) * a.m - lo);
      const Acc c[3] = {coef[3 * n], coef[3 * n + 1], coef[3 * n + 2]};  // c_x, c_e, sigma
      reverse_step_chunk(x + lo, z + lo, eps_p + lo, eps_o + lo, nm, a.k, c, prev_policy + lo,
                         prev_other + lo, len);
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
      scale_chunk(grad + lo, -static_cast<Acc>(coef[3 * n + 1]), out + lo, len);
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
