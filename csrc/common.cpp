// Host-side checks and layout normalization shared by the CPU and CUDA kernels.
#include "common.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace ncp {

namespace {

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor (fp32, bf16, fp16 or fp64), got ", t.scalar_type());
}

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type(),
              " (ncp.ops casts mixed inputs; the raw op needs one dtype)");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

}  // namespace

at::Tensor stack_in_format(const at::Tensor& t, const at::Tensor& like, at::MemoryFormat fmt) {
  const int64_t k = t.size(0);
  if (fmt == at::MemoryFormat::Contiguous) {
    return t.contiguous();
  }
  bool ok = t.stride(0) == like.numel() || k == 1;
  for (int64_t i = 0; ok && i < k; ++i) {
    ok = t.select(0, i).is_contiguous(fmt);
  }
  if (ok) {
    return t;
  }
  at::Tensor out = empty_stack(k, like, fmt);
  out.copy_(t);
  return out;
}

at::Tensor empty_stack(int64_t k, const at::Tensor& like, at::MemoryFormat fmt) {
  std::vector<int64_t> flat(like.sizes().begin(), like.sizes().end());
  std::vector<int64_t> stacked{k};
  stacked.insert(stacked.end(), flat.begin(), flat.end());
  flat[0] *= k;
  return at::empty(flat, like.options().memory_format(fmt)).view(stacked);
}

ReverseStepArgs prepare_reverse_step(const at::Tensor& x_t, const at::Tensor& eps_policy,
                                     const at::Tensor& eps_other, const at::Tensor& z,
                                     const at::Tensor& coef) {
  constexpr const char* op = "ncp::reverse_step";
  TORCH_CHECK(x_t.dim() >= 1, op, ": x_t must have a batch dimension");
  check_floating(x_t, op, "x_t");
  TORCH_CHECK(eps_policy.sizes() == x_t.sizes(), op, ": eps_policy has shape ", eps_policy.sizes(),
              ", x_t has ", x_t.sizes());
  TORCH_CHECK(z.sizes() == x_t.sizes(), op, ": z has shape ", z.sizes(), ", x_t has ", x_t.sizes());
  TORCH_CHECK(eps_other.dim() == x_t.dim() + 1 && eps_other.sizes().slice(1) == x_t.sizes(), op,
              ": eps_other must be (K, *x_t.shape), got ", eps_other.sizes(), " for x_t ",
              x_t.sizes());
  check_same(eps_policy, x_t, op, "eps_policy", "x_t");
  check_same(eps_other, x_t, op, "eps_other", "x_t");
  check_same(z, x_t, op, "z", "x_t");
  const int64_t n = x_t.size(0);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == n && coef.size(1) == 3, op,
              ": coef must be (N, 3) [c_x, c_e, sigma], got ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ",
              coef.scalar_type());
  TORCH_CHECK(coef.device() == x_t.device(), op, ": coef is on ", coef.device(), ", x_t on ",
              x_t.device());

  ReverseStepArgs a;
  a.fmt = kernel_format(x_t);
  a.x = in_format(x_t, a.fmt);
  a.eps_policy = in_format(eps_policy, a.fmt);
  a.z = in_format(z, a.fmt);
  a.eps_other = stack_in_format(eps_other, a.x, a.fmt);
  a.coef = coef.contiguous();
  a.n = n;
  a.m = n == 0 ? 0 : x_t.numel() / n;
  a.k = eps_other.size(0);
  return a;
}

std::pair<at::Tensor, at::Tensor> prepare_reverse_step_backward(const at::Tensor& grad,
                                                                const at::Tensor& coef) {
  constexpr const char* op = "ncp::reverse_step_backward";
  TORCH_CHECK(grad.dim() >= 1, op, ": grad must have a batch dimension");
  check_floating(grad, op, "grad_prev_policy");
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == grad.size(0) && coef.size(1) == 3, op,
              ": coef must be (N, 3), got ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": coef must be float32");
  TORCH_CHECK(coef.device() == grad.device(), op, ": coef and grad on different devices");
  return {in_format(grad, kernel_format(grad)), coef.contiguous()};
}

MultiscaleArgs prepare_multiscale(at::TensorList policy, at::TensorList reference,
                                  at::TensorList target, c10::ArrayRef<double> weights,
                                  const char* op) {
  const size_t s_count = policy.size();
  TORCH_CHECK(s_count > 0 && target.size() == s_count && weights.size() == s_count, op,
              " needs one policy, target and weight per scale; got ", policy.size(), ", ",
              target.size(), ", ", weights.size());
  TORCH_CHECK(reference.empty() || reference.size() == s_count, op, ": ", reference.size(),
              " reference scales for ", s_count, " policy scales");
  MultiscaleArgs a;
  a.has_reference = !reference.empty();
  a.weights.assign(weights.begin(), weights.end());
  a.dtype = policy[0].scalar_type();
  a.n = policy[0].dim() >= 1 ? policy[0].size(0) : 0;
  for (size_t s = 0; s < s_count; ++s) {
    const at::Tensor& p = policy[s];
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == a.n, op, ": policy[", s, "] has shape ", p.sizes(),
                ", expected ", a.n, " samples");
    check_floating(p, op, "policy");
    check_same(p, policy[0], op, "a policy scale", "policy[0]");
    TORCH_CHECK(target[s].sizes() == p.sizes(), op, ": target[", s, "] has shape ",
                target[s].sizes(), ", policy[", s, "] has ", p.sizes());
    check_same(target[s], p, op, "target", "policy");
    ScaleOperands so;
    so.fmt = kernel_format(p);
    so.policy = in_format(p, so.fmt);
    so.target = in_format(target[s], so.fmt);
    if (a.has_reference) {
      TORCH_CHECK(reference[s].sizes() == p.sizes(), op, ": reference[", s, "] has shape ",
                  reference[s].sizes(), ", policy[", s, "] has ", p.sizes());
      check_same(reference[s], p, op, "reference", "policy");
      so.reference = in_format(reference[s], so.fmt);
    }
    so.m = a.n == 0 ? 0 : p.numel() / a.n;
    a.scales.push_back(std::move(so));
  }
  return a;
}

at::Tensor prepare_error_grad(const at::Tensor& grad, const MultiscaleArgs& args) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == args.n,
              "ncp::multiscale_error_backward: grad_err_policy must be (N,) with N = ", args.n,
              ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == args.scales[0].policy.device(),
              "ncp::multiscale_error_backward: grad on ", grad.device(), ", features on ",
              args.scales[0].policy.device());
  return grad.to(error_dtype(args.dtype)).contiguous();
}

}  // namespace ncp
