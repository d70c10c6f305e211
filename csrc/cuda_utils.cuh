// Device helpers shared by the CUDA kernels: 16-byte vector packs and block sums.
#pragma once

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime_api.h>

namespace ncp {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every ncp kernel

// V elements of T moved as one aligned vector load/store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Number of SMs of the current device (cached per device; no ATen/cuda headers,
// which pull in cuBLAS/cuSPARSE headers that a bare nvcc install lacks).
inline int64_t sm_count() {
  static int cache[64] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cache[dev] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = sms > 0 ? sms : 1;
  }
  return cache[dev];
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block (kThreads threads); valid in thread 0. `smem` holds 32 values.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? smem[threadIdx.x] : Acc(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // smem may be reused by the caller
  return v;
}

}  // namespace cuda
}  // namespace ncp
