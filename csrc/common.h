// Shared host-side helpers of the ncp._C kernels: layout normalization and checks.
//
// Every kernel walks a tensor as N consecutive per-sample blocks of M elements
// (M = numel / N). That holds for contiguous tensors and for 4-D channels-last
// tensors alike (the batch stride is outermost in both), so a per-sample mean is
// layout-independent as long as all operands of one kernel share one layout.
// `kernel_format` picks that layout from the leading operand; the others are
// brought to it (a no-op when they already are).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace ncp {

// Channels-last when `t` is a dense 4-D channels-last tensor that is not also
// plainly contiguous; contiguous otherwise. The fake (meta) kernels in
// python/ncp/ops/fused.py apply the same rule, so output strides agree.
inline at::MemoryFormat kernel_format(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// `t` laid out in `fmt` (copies only when it is not already).
inline at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  if (fmt == at::MemoryFormat::ChannelsLast && t.dim() != 4) {
    return t.contiguous();
  }
  return t.contiguous(fmt);
}

// A (K, N, ...) stack whose every slice [k] is laid out in `fmt` and whose
// slices follow each other in memory; `like` is one (N, ...) slice.
at::Tensor stack_in_format(const at::Tensor& t, const at::Tensor& like, at::MemoryFormat fmt);

// Allocates a (K, N, ...) stack laid out as `stack_in_format` returns it.
at::Tensor empty_stack(int64_t k, const at::Tensor& like, at::MemoryFormat fmt);

// Accumulation/output dtype of the errors: fp64 for fp64 inputs, fp32 otherwise.
inline at::ScalarType error_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- reverse_step ---------------------------------------------------------
struct ReverseStepArgs {
  at::Tensor x, eps_policy, eps_other, z, coef;  // normalized operands
  at::MemoryFormat fmt;
  int64_t n, m, k;  // samples, elements per sample, no-grad branches
};

// Checks the operands (shapes, dtypes, devices) and brings them to one layout.
ReverseStepArgs prepare_reverse_step(const at::Tensor& x_t, const at::Tensor& eps_policy,
                                     const at::Tensor& eps_other, const at::Tensor& z,
                                     const at::Tensor& coef);

// Checks grad_prev_policy and coef of the backward; returns them normalized.
std::pair<at::Tensor, at::Tensor> prepare_reverse_step_backward(const at::Tensor& grad,
                                                                const at::Tensor& coef);

// ---- multiscale_error -----------------------------------------------------
struct ScaleOperands {
  at::Tensor policy, reference, target;  // reference undefined without a reference branch
  at::MemoryFormat fmt;
  int64_t m;  // elements per sample
};

struct MultiscaleArgs {
  std::vector<ScaleOperands> scales;
  std::vector<double> weights;
  int64_t n;  // samples
  bool has_reference;
  at::ScalarType dtype;
};

MultiscaleArgs prepare_multiscale(at::TensorList policy, at::TensorList reference,
                                  at::TensorList target, c10::ArrayRef<double> weights,
                                  const char* op);

// The (N,) gradient of the policy errors as a contiguous tensor of the error dtype.
at::Tensor prepare_error_grad(const at::Tensor& grad, const MultiscaleArgs& args);

}  // namespace ncp
