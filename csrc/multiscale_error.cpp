// CPU kernels of ncp::multiscale_error and ncp::multiscale_error_backward.
//
// Work items are (scale, sample, chunk); each sums the squared differences of
// policy and of reference against target over its chunk in 16 fp32 lanes (a
// loop the compiler vectorizes without reassociation). Chunk sums are then
// added in fp64 in a fixed order, so the result does not depend on the number
// of threads.
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

constexpr int64_t kChunk = 8192;  // elements per work item
constexpr int kLanes = 16;

// lanes[j] += (a - t)^2 over len elements, in kLanes independent accumulators
// (a loop the compiler vectorizes without reassociation).
template <typename T>
__attribute__((always_inline)) inline void add_squared_diff(const T* __restrict__ a, const T* __restrict__ t,
                                                            int64_t len, at::opmath_type<T>* __restrict__ lanes) {
  using Acc = at::opmath_type<T>;
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const Acc d = cpu::to_acc(a[i + j]) - cpu::to_acc(t[i + j]);
      lanes[j] += d * d;
    }
  }
  for (int j = 0; i < len; ++i, ++j) {
    const Acc d = cpu::to_acc(a[i]) - cpu::to_acc(t[i]);
    lanes[j] += d * d;
  }
}

// Sums of (p - t)^2 and (r - t)^2 over len elements (r may be null). One branch
// per inner loop (GCC does not vectorize a loop over both), alternating every
// kBlock elements: `t` is reused from L1 and all three streams stay in flight,
// which a single core needs to reach its memory bandwidth.
template <typename T>
NCP_CPU_CLONES std::pair<double, double> squared_diff_sums(const T* p, const T* r, const T* t, int64_t len) {
  using Acc = at::opmath_type<T>;
  constexpr int64_t kBlock = 512;
  Acc lp[kLanes] = {}, lr[kLanes] = {};
  for (int64_t lo = 0; lo < len; lo += kBlock) {
    const int64_t n = std::min(kBlock, len - lo);
    add_squared_diff(p + lo, t + lo, n, lp);
    if (r != nullptr) add_squared_diff(r + lo, t + lo, n, lr);
  }
  double sp = 0.0, sr = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    sp += static_cast<double>(lp[j]);
    sr += static_cast<double>(lr[j]);
  }
  return {sp, sr};
}

// Item layout: scale s owns items [begin[s], begin[s+1]); within it, sample-major chunks.
struct Items {
  std::vector<int64_t> begin, chunks;
  int64_t total = 0;
};

Items make_items(const MultiscaleArgs& a) {
  Items it;
  for (const ScaleOperands& so : a.scales) {
    it.begin.push_back(it.total);
    it.chunks.push_back(std::max<int64_t>(1, (so.m + kChunk - 1) / kChunk));
    it.total += a.n * it.chunks.back();
  }
  it.begin.push_back(it.total);
  return it;
}

// Scale index of an item (S is small: a linear scan).
inline size_t scale_of(const Items& it, int64_t item) {
  size_t s = 0;
  while (item >= it.begin[s + 1]) ++s;
  return s;
}

template <typename T>
void multiscale_error_cpu_kernel(const MultiscaleArgs& a, const Items& it, double* partials) {
  at::parallel_for(0, it.total, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const size_t s = scale_of(it, item);
      const ScaleOperands& so = a.scales[s];
      const int64_t local = item - it.begin[s];
      const int64_t n = local / it.chunks[s];
      const int64_t lo = n * so.m + (local % it.chunks[s]) * kChunk;
      const int64_t len = std::min(kChunk, (n + 1) * so.m - lo);
      const T* p = so.policy.const_data_ptr<T>() + lo;
      const T* t = so.target.const_data_ptr<T>() + lo;
      const T* r = a.has_reference ? so.reference.const_data_ptr<T>() + lo : nullptr;
      const std::pair<double, double> sums = squared_diff_sums(p, r, t, len);
      partials[2 * item] = sums.first;
      partials[2 * item + 1] = sums.second;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multiscale_error_cpu(at::TensorList policy,
                                                        at::TensorList reference,
                                                        at::TensorList target,
                                                        c10::ArrayRef<double> weights) {
  const MultiscaleArgs a = prepare_multiscale(policy, reference, target, weights, "ncp::multiscale_error");
  const auto opts = a.scales[0].policy.options().dtype(error_dtype(a.dtype));
  at::Tensor err_p = at::empty({a.n}, opts);
  at::Tensor err_r = at::empty({a.has_reference ? a.n : 0}, opts);
  const Items it = make_items(a);
  std::vector<double> partials(2 * it.total, 0.0);
  if (a.n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multiscale_error_cpu", [&] {
      multiscale_error_cpu_kernel<scalar_t>(a, it, partials.data());
    });
  }
  AT_DISPATCH_FLOATING_TYPES(err_p.scalar_type(), "multiscale_error_cpu_out", [&] {
    scalar_t* out_p = err_p.mutable_data_ptr<scalar_t>();
    scalar_t* out_r = a.has_reference ? err_r.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t n = 0; n < a.n; ++n) {
      double ep = 0.0, er = 0.0;
      for (size_t s = 0; s < a.scales.size(); ++s) {
        double sp = 0.0, sr = 0.0;
        const int64_t first = it.begin[s] + n * it.chunks[s];
        for (int64_t c = 0; c < it.chunks[s]; ++c) {
          sp += partials[2 * (first + c)];
          sr += partials[2 * (first + c) + 1];
        }
        const double scale = a.scales[s].m > 0 ? a.weights[s] / static_cast<double>(a.scales[s].m) : 0.0;
        ep += scale * sp;
        er += scale * sr;
      }
      out_p[n] = static_cast<scalar_t>(ep);
      if (out_r != nullptr) out_r[n] = static_cast<scalar_t>(er);
    }
  });
  return {err_p, err_r};
}

// g = f * (p - t).
template <typename T>
NCP_CPU_CLONES void scaled_diff(const T* __restrict__ p, const T* __restrict__ t, at::opmath_type<T> f,
                                T* __restrict__ g, int64_t len) {
  for (int64_t i = 0; i < len; ++i) g[i] = cpu::from_acc<T>(f * (cpu::to_acc(p[i]) - cpu::to_acc(t[i])));
}

template <typename T>
void multiscale_error_backward_cpu_kernel(const MultiscaleArgs& a, const Items& it,
                                          const at::opmath_type<T>* grad, std::vector<T*>& outs) {
  using Acc = at::opmath_type<T>;
  at::parallel_for(0, it.total, 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const size_t s = scale_of(it, item);
      const ScaleOperands& so = a.scales[s];
      const int64_t local = item - it.begin[s];
      const int64_t n = local / it.chunks[s];
      const int64_t lo = n * so.m + (local % it.chunks[s]) * kChunk;
      const int64_t len = std::min(kChunk, (n + 1) * so.m - lo);
      const Acc f = static_cast<Acc>(grad[n] * (2.0 * a.weights[s] / static_cast<double>(so.m)));
      const T* p = so.policy.const_data_ptr<T>() + lo;
      const T* t = so.target.const_data_ptr<T>() + lo;
      scaled_diff(p, t, f, outs[s] + lo, len);
    }
  });
}

std::vector<at::Tensor> multiscale_error_backward_cpu(const at::Tensor& grad_err_policy,
                                                      at::TensorList policy, at::TensorList target,
                                                      c10::ArrayRef<double> weights) {
  const MultiscaleArgs a = prepare_multiscale(policy, {}, target, weights, "ncp::multiscale_error_backward");
  const at::Tensor grad = prepare_error_grad(grad_err_policy, a);
  std::vector<at::Tensor> grads;
  for (const ScaleOperands& so : a.scales) {
    grads.push_back(at::empty(so.policy.sizes(), so.policy.options().memory_format(so.fmt)));
  }
  const Items it = make_items(a);
  if (a.n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multiscale_error_backward_cpu", [&] {
      std::vector<scalar_t*> outs;
      for (at::Tensor& g : grads) outs.push_back(g.mutable_data_ptr<scalar_t>());
      multiscale_error_backward_cpu_kernel<scalar_t>(
          a, it, grad.const_data_ptr<at::opmath_type<scalar_t>>(), outs);
    });
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(ncp, CPU, m) {
  m.impl("multiscale_error", &multiscale_error_cpu);
  m.impl("multiscale_error_backward", &multiscale_error_backward_cpu);
}

}  // namespace ncp
