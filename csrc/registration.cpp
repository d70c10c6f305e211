// Schemas of the ncp ops and the Python module stub of ncp._C.
//
// Kernels register themselves per backend (reverse_step.cpp / reverse_step_cuda.cu,
// multiscale_error.cpp / multiscale_error_cuda.cu); fake kernels and autograd live in
// python/ncp/ops/fused.py. Contracts: docs/internals.md.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(ncp, m) {
  // x_t, eps_policy, z: (N, ...); eps_other: (K, N, ...); coef: fp32 (N, 3) [c_x, c_e, sigma].
  m.def("reverse_step(Tensor x_t, Tensor eps_policy, Tensor eps_other, Tensor z, Tensor coef)"
        " -> (Tensor prev_policy, Tensor prev_other)");
  // -c_e * grad_prev_policy: the gradient of eps_policy.
  m.def("reverse_step_backward(Tensor grad_prev_policy, Tensor coef) -> Tensor");
  // Per-sample sum_s w_s * mean (x_s - target_s)^2 for policy and reference, all scales at once.
  m.def("multiscale_error(Tensor[] policy, Tensor[] reference, Tensor[] target, float[] weights)"
        " -> (Tensor err_policy, Tensor err_reference)");
  // d err_policy / d policy_s, times grad_err_policy: one tensor per scale.
  m.def("multiscale_error_backward(Tensor grad_err_policy, Tensor[] policy, Tensor[] target,"
        " float[] weights) -> Tensor[]");
}

// `import ncp._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ncp fused ops (torch.ops.ncp)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
