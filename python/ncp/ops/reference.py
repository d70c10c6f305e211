"""Pure-PyTorch reference of the fused ops.

These are the test oracle of ``ncp._C`` and the fallback when the extension is
not built. Contracts: ``docs/internals.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def reverse_step(
    x_t: Tensor, eps_policy: Tensor, eps_other: Tensor, z: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """DDPM posterior step ``x_{t-1} = c_x x_t - c_e eps + sigma z`` for every branch.

    x_t, eps_policy, z: (N, C, H, W); eps_other: (K, N, C, H, W);
    coef: (N, 3) fp32 columns [c_x, c_e, sigma]. Computed in fp32 (fp64 for fp64
    inputs), returned in x_t's dtype.
    """
    acc = _acc_dtype(x_t, eps_policy, eps_other, z)
    c = coef.to(acc).view(-1, 3, *([1] * (x_t.dim() - 1)))
    c_x, c_e, sigma = c[:, 0], c[:, 1], c[:, 2]  # each (N, 1, 1, 1)
    base = c_x * x_t.to(acc) + sigma * z.to(acc)  # (N, C, H, W)
    prev_policy = base - c_e * eps_policy.to(acc)
    prev_other = base.unsqueeze(0) - c_e.unsqueeze(0) * eps_other.to(acc)  # (K, N, C, H, W)
    return prev_policy.to(x_t.dtype), prev_other.to(x_t.dtype)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 arithmetic, fp64 when any input is fp64 (the tests' gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_scales(policy, reference, target, weights) -> None:
    """The list arguments of ``multiscale_error`` agree: one policy, target and weight per scale."""
    if not (len(policy) == len(target) == len(weights)) or len(policy) == 0:
        raise ValueError(
            f"multiscale_error needs one policy, target and weight per scale; got "
            f"{len(policy)}, {len(target)}, {len(weights)}"
        )
    if reference and len(reference) != len(policy):
        raise ValueError(f"multiscale_error: {len(reference)} reference scales for {len(policy)} policy scales")


def _per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    acc = _acc_dtype(a, b)
    return (a.to(acc) - b.to(acc)).pow(2).flatten(1).mean(dim=1)  # (N,)


def multiscale_error(
    policy: list[Tensor], reference: list[Tensor], target: list[Tensor], weights: list[float]
) -> tuple[Tensor, Tensor]:
    """Per-sample ``sum_s w_s * mean_{C,H,W} (x_s - target_s)^2`` for policy and reference.

    Returns fp32 (N,) tensors (fp64 for fp64 inputs); the reference error is an
    empty (0,) tensor when ``reference`` is empty.
    """
    check_scales(policy, reference, target, weights)
    err_policy = sum(w * _per_sample_mse(p, t) for p, t, w in zip(policy, target, weights))
    if reference:
        err_reference = sum(w * _per_sample_mse(r, t) for r, t, w in zip(reference, target, weights))
    else:
        err_reference = policy[0].new_zeros(0, dtype=err_policy.dtype)
    return err_policy, err_reference
