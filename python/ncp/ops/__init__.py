"""Fused ops of an NCP step (reverse step, multi-scale embedding error).

``reverse_step`` and ``multiscale_error`` (contracts: ``docs/internals.md``) run
the fused C++/CUDA kernels of ``ncp._C`` on every device the extension was
built for, and the pure-PyTorch reference (``ncp.ops.reference``) elsewhere.
When the extension is missing, or built without CUDA kernels on a machine with
a GPU, a notice says so once. ``NCP_OPS=reference`` forces the reference.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from ncp.ops import reference as _reference

logger = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the build
    from ncp.ops import fused

    HAVE_EXTENSION = True
except ImportError as _err:  # the package works without the extension
    fused = None
    HAVE_EXTENSION = False
    logger.warning("ncp._C is not built (%s): using the pure-PyTorch reference ops", _err)


def _fused_devices() -> frozenset[str]:
    if not HAVE_EXTENSION:
        return frozenset()
    if os.environ.get("NCP_OPS", "fused") == "reference":
        logger.warning("NCP_OPS=reference: using the pure-PyTorch reference ops")
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    devices = frozenset(d for d in ("cpu", "cuda") if has("ncp::reverse_step", d.upper()))
    if "cuda" not in devices and torch.cuda.is_available():
        logger.warning("ncp._C was built without CUDA kernels: CUDA tensors use the pure-PyTorch reference ops")
    return devices


# Device types ("cpu", "cuda") whose tensors run the fused kernels.
FUSED_DEVICES: frozenset[str] = _fused_devices()


def reverse_step(
    x_t: Tensor, eps_policy: Tensor, eps_other: Tensor, z: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """``x_{t-1} = c_x x_t - c_e eps + sigma z`` for the policy and the K no-grad branches.

    x_t, eps_policy, z: (N, C, H, W); eps_other: (K, N, C, H, W); coef: fp32 (N, 3)
    [c_x, c_e, sigma]. Returns (prev_policy, prev_other) in x_t's dtype; the
    backward gives the gradient of eps_policy.
    """
    if x_t.device.type in FUSED_DEVICES:
        return fused.reverse_step(x_t, eps_policy, eps_other, z, coef)
    return _reference.reverse_step(x_t, eps_policy, eps_other, z, coef)


def multiscale_error(
    policy: Sequence[Tensor], reference: Sequence[Tensor], target: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Per-sample ``sum_s w_s * mean_{C,H,W} (x_s - target_s)^2`` for policy and reference.

    Lists of S tensors (N, C_s, H_s, W_s); ``reference`` may be empty (then the
    second result is an empty fp32 tensor). Returns fp32 (N,) errors (fp64 for
    fp64 inputs); the backward gives the gradient of the policy features.
    """
    if policy and policy[0].device.type in FUSED_DEVICES:
        return fused.multiscale_error(policy, reference, target, weights)
    return _reference.multiscale_error(policy, reference, target, weights)


__all__ = ["reverse_step", "multiscale_error", "HAVE_EXTENSION", "FUSED_DEVICES"]
