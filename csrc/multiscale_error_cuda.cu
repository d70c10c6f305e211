// CUDA kernels of ncp::multiscale_error and ncp::multiscale_error_backward.
//
// All scales and both branches in one launch: a table of per-scale pointers
// and sizes travels as a kernel argument, and each block owns one work item
// (scale, sample, chunk). The forward reads policy, reference and target once
// (target shared by both branches), sums both squared differences in fp32,
// writes one partial per item, and the last block to finish adds the partials
// of each (branch, sample) in a fixed order in fp64: deterministic, no atomics
// on the results (one atomic ticket per block). The backward writes d err_policy / d policy for every scale,
// again in one launch.
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

constexpr int kMaxScales = 12;  // per launch; longer lists take several launches
constexpr int64_t kChunkQuantum = kThreads * 8;  // chunks are multiples of one vector sweep

struct ScaleDesc {
  const void* policy;
  const void* reference;
  const void* target;
  void* grad;          // backward output
  int64_t m;           // elements per sample
  int64_t chunks;      // work items per sample
  int64_t begin;       // first work item of the scale
  double scale;        // forward: w / m; backward: 2 w / m
  int vec;             // 16-byte vectors allowed
};

struct Table {
  ScaleDesc s[kMaxScales];
  int count;
  int64_t n;
  int64_t chunk;
  int has_reference;
};

__device__ __forceinline__ int scale_of(const Table& tab, int64_t item) {
  int s = 0;
  while (s + 1 < tab.count && item >= tab.s[s + 1].begin) ++s;
  return s;
}

template <typename T, int V, bool WithRef, typename Acc>
__device__ __forceinline__ void squared_sums(const T* p, const T* r, const T* t, int64_t lo, int64_t hi,
                                             Acc& sp, Acc& sr) {
  for (int64_t i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    const Pack<T, V> tv = cuda::load<T, V>(t + i);
    const Pack<T, V> pv = cuda::load<T, V>(p + i);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc d = static_cast<Acc>(pv.v[j]) - static_cast<Acc>(tv.v[j]);
      sp += d * d;
    }
    if constexpr (WithRef) {
      const Pack<T, V> rv = cuda::load<T, V>(r + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Acc d = static_cast<Acc>(rv.v[j]) - static_cast<Acc>(tv.v[j]);
        sr += d * d;
      }
    }
  }
}

template <typename T, bool WithRef, typename Acc>
__device__ __forceinline__ void item_sums(const ScaleDesc& d, int64_t n, int64_t lo, int64_t hi, Acc& sp, Acc& sr) {
  const int64_t base = n * d.m;
  const T* p = static_cast<const T*>(d.policy) + base;
  const T* r = WithRef ? static_cast<const T*>(d.reference) + base : nullptr;
  const T* t = static_cast<const T*>(d.target) + base;
  if (d.vec) {
    squared_sums<T, cuda::kVec<T>, WithRef>(p, r, t, lo, hi, sp, sr);
  } else {
    squared_sums<T, 1, WithRef>(p, r, t, lo, hi, sp, sr);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    multiscale_error_kernel(const Table tab, at::opmath_type<T>* __restrict__ partials,
                            unsigned int* __restrict__ counter, at::opmath_type<T>* __restrict__ err_p,
                            at::opmath_type<T>* __restrict__ err_r, int accumulate) {
  using Acc = at::opmath_type<T>;
  __shared__ Acc smem[32];
  __shared__ bool is_last;
  const int64_t item = blockIdx.x;
  const ScaleDesc& d = tab.s[scale_of(tab, item)];
  const int64_t local = item - d.begin;
  const int64_t n = local / d.chunks;
  const int64_t lo = (local % d.chunks) * tab.chunk;
  const int64_t hi = lo + tab.chunk < d.m ? lo + tab.chunk : d.m;
  Acc sp = 0, sr = 0;
  if (tab.has_reference) {
    item_sums<T, true>(d, n, lo, hi, sp, sr);
  } else {
    item_sums<T, false>(d, n, lo, hi, sp, sr);
  }
  sp = cuda::block_sum(sp, smem);
  sr = cuda::block_sum(sr, smem);
  if (threadIdx.x == 0) {
    partials[2 * item] = sp;
    partials[2 * item + 1] = sr;
    __threadfence();  // the partials are visible before the ticket is taken
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block: err[branch][n] = sum_s w_s / m_s * sum_chunks partial. One warp per
  // (branch, sample), its lanes striding over the chunks, then a shuffle sum: a fixed order
  // (deterministic) with the loads of a lane independent of each other.
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t pairs = (tab.has_reference ? 2 : 1) * tab.n;
  for (int64_t j = warp; j < pairs; j += kThreads / 32) {
    const int branch = static_cast<int>(j / tab.n);
    const int64_t sample = j % tab.n;
    double total = 0.0;
    for (int s = 0; s < tab.count; ++s) {
      const ScaleDesc& sd = tab.s[s];
      const Acc* first = partials + 2 * (sd.begin + sample * sd.chunks) + branch;
      double sum = 0.0;
#pragma unroll 4
      for (int64_t c = lane; c < sd.chunks; c += 32) sum += static_cast<double>(__ldcg(first + 2 * c));
      total += sd.scale * sum;
    }
    total = cuda::warp_sum(total);
    if (lane == 0) {
      Acc* out = branch == 0 ? err_p : err_r;
      out[sample] = static_cast<Acc>(accumulate ? static_cast<double>(out[sample]) + total : total);
    }
  }
}

template <typename T, int V, typename Acc>
__device__ __forceinline__ void scaled_diff(const T* p, const T* t, T* g, Acc f, int64_t lo, int64_t hi) {
  for (int64_t i = lo + threadIdx.x * V; i < hi; i += kThreads * V) {
    const Pack<T, V> pv = cuda::load<T, V>(p + i);
    const Pack<T, V> tv = cuda::load<T, V>(t + i);
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = static_cast<T>(f * (static_cast<Acc>(pv.v[j]) - static_cast<Acc>(tv.v[j])));
    cuda::store<T, V>(g + i, o);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    multiscale_error_backward_kernel(const Table tab, const at::opmath_type<T>* __restrict__ grad_err) {
  using Acc = at::opmath_type<T>;
  const int64_t item = blockIdx.x;
  const ScaleDesc& d = tab.s[scale_of(tab, item)];
  const int64_t local = item - d.begin;
  const int64_t n = local / d.chunks;
  const int64_t lo = (local % d.chunks) * tab.chunk;
  const int64_t hi = lo + tab.chunk < d.m ? lo + tab.chunk : d.m;
  const Acc f = static_cast<Acc>(static_cast<double>(grad_err[n]) * d.scale);
  const int64_t base = n * d.m;
  const T* p = static_cast<const T*>(d.policy) + base;
  const T* t = static_cast<const T*>(d.target) + base;
  T* g = static_cast<T*>(d.grad) + base;
  if (d.vec) {
    scaled_diff<T, cuda::kVec<T>>(p, t, g, f, lo, hi);
  } else {
    scaled_diff<T, 1>(p, t, g, f, lo, hi);
  }
}

// Elements per work item: about 16 blocks per SM over the whole launch (2-3 waves, a short
// tail), within [2K, 64K] elements.
int64_t pick_chunk(const MultiscaleArgs& a) {
  int64_t total = 0;
  for (const ScaleOperands& so : a.scales) total += a.n * so.m;
  const int64_t sms = cuda::sm_count();
  const int64_t chunk = std::clamp<int64_t>(total / (16 * sms), kChunkQuantum, 32 * kChunkQuantum);
  return (chunk + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum;
}

// The table of scales [first, first + count); returns the number of work items.
template <typename T>
int64_t fill_table(Table& tab, const MultiscaleArgs& a, size_t first, int count, int64_t chunk,
                   const std::vector<at::Tensor>* grads, bool backward) {
  tab.count = count;
  tab.n = a.n;
  tab.chunk = chunk;
  tab.has_reference = a.has_reference ? 1 : 0;
  int64_t items = 0;
  for (int i = 0; i < count; ++i) {
    const ScaleOperands& so = a.scales[first + i];
    ScaleDesc& d = tab.s[i];
    d.policy = so.policy.const_data_ptr<T>();
    d.target = so.target.const_data_ptr<T>();
    d.reference = a.has_reference ? so.reference.const_data_ptr<T>() : nullptr;
    d.grad = grads != nullptr ? (*grads)[first + i].mutable_data_ptr<T>() : nullptr;
    d.m = so.m;
    d.chunks = std::max<int64_t>(1, (so.m + chunk - 1) / chunk);
    d.begin = items;
    const double w = a.weights[first + i];
    d.scale = so.m > 0 ? (backward ? 2.0 * w : w) / static_cast<double>(so.m) : 0.0;
    bool vec = so.m % cuda::kVec<T> == 0 && cuda::aligned16(d.policy) && cuda::aligned16(d.target);
    if (a.has_reference) vec = vec && cuda::aligned16(d.reference);
    if (d.grad != nullptr) vec = vec && cuda::aligned16(d.grad);
    d.vec = vec ? 1 : 0;
    items += a.n * d.chunks;
  }
  return items;
}

std::tuple<at::Tensor, at::Tensor> multiscale_error_cuda(at::TensorList policy, at::TensorList reference,
                                                         at::TensorList target, c10::ArrayRef<double> weights) {
  const c10::cuda::OptionalCUDAGuard guard(policy.empty() ? c10::Device(c10::kCUDA) : policy[0].device());
  const MultiscaleArgs a = prepare_multiscale(policy, reference, target, weights, "ncp::multiscale_error");
  const auto opts = a.scales[0].policy.options().dtype(error_dtype(a.dtype));
  at::Tensor err_p = at::empty({a.n}, opts);
  at::Tensor err_r = at::empty({a.has_reference ? a.n : 0}, opts);
  if (a.n == 0) return {err_p, err_r};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk = pick_chunk(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multiscale_error_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    for (size_t first = 0; first < a.scales.size(); first += kMaxScales) {
      const int count = static_cast<int>(std::min<size_t>(kMaxScales, a.scales.size() - first));
      Table tab;
      const int64_t items = fill_table<scalar_t>(tab, a, first, count, chunk, nullptr, false);
      TORCH_CHECK(items < (int64_t(1) << 31), "ncp::multiscale_error: too many work items (", items, ")");
      // One workspace: the per-item partials, then the ticket counter (zeroed by a memset).
      at::Tensor ws = at::empty({static_cast<int64_t>(2 * items * sizeof(Acc) + sizeof(Acc))},
                                opts.dtype(at::kByte));
      Acc* partials = reinterpret_cast<Acc*>(ws.mutable_data_ptr());
      auto* counter = reinterpret_cast<unsigned int*>(partials + 2 * items);
      C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
      multiscale_error_kernel<scalar_t><<<items, kThreads, 0, stream>>>(
          tab, partials, counter, err_p.mutable_data_ptr<Acc>(),
          a.has_reference ? err_r.mutable_data_ptr<Acc>() : nullptr, first > 0 ? 1 : 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {err_p, err_r};
}

std::vector<at::Tensor> multiscale_error_backward_cuda(const at::Tensor& grad_err_policy, at::TensorList policy,
                                                       at::TensorList target, c10::ArrayRef<double> weights) {
  const c10::cuda::OptionalCUDAGuard guard(grad_err_policy.device());
  const MultiscaleArgs a = prepare_multiscale(policy, {}, target, weights, "ncp::multiscale_error_backward");
  const at::Tensor grad = prepare_error_grad(grad_err_policy, a);
  std::vector<at::Tensor> grads;
  for (const ScaleOperands& so : a.scales) {
    grads.push_back(at::empty(so.policy.sizes(), so.policy.options().memory_format(so.fmt)));
  }
  if (a.n == 0) return grads;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk = pick_chunk(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "multiscale_error_backward_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    for (size_t first = 0; first < a.scales.size(); first += kMaxScales) {
      const int count = static_cast<int>(std::min<size_t>(kMaxScales, a.scales.size() - first));
      Table tab;
      const int64_t items = fill_table<scalar_t>(tab, a, first, count, chunk, &grads, true);
      TORCH_CHECK(items < (int64_t(1) << 31), "ncp::multiscale_error_backward: too many work items (", items, ")");
      multiscale_error_backward_kernel<scalar_t><<<items, kThreads, 0, stream>>>(tab, grad.const_data_ptr<Acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(ncp, CUDA, m) {
  m.impl("multiscale_error", &multiscale_error_cuda);
  m.impl("multiscale_error_backward", &multiscale_error_backward_cuda);
}

}  // namespace ncp
