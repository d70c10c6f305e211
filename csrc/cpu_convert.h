// Element conversions of the CPU kernels, written so that GCC vectorizes the loops
// that use them: bf16 <-> fp32 as plain bit operations (c10::BFloat16's own
// conversions are correct but keep the loops scalar). Other types use static_cast.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

// The hot loops are compiled three times, for AVX-512, AVX2 and the x86-64
// baseline, and the best one the CPU supports is picked when the library loads
// (function multiversioning through an ifunc resolver); elsewhere they are plain
// functions. Define NCP_NO_CPU_CLONES to build the baseline only.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(NCP_NO_CPU_CLONES)
#define NCP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NCP_CPU_CLONES
#endif

namespace ncp {
namespace cpu {

template <typename T>
inline at::opmath_type<T> to_acc(T v) {
  return static_cast<at::opmath_type<T>>(v);
}

template <>
inline float to_acc<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_acc(at::opmath_type<T> v) {
  return static_cast<T>(v);
}

// Round to nearest even, NaN to the canonical quiet NaN: as c10::BFloat16(float).
template <>
inline c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = v != v ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

}  // namespace cpu
}  // namespace ncp
