"""Python side of the fused ops ``torch.ops.ncp.*`` (kernels in ``csrc/``).

Importing this module loads ``ncp._C`` (ImportError when it is not built) and
registers, for each op, a fake kernel (shapes and strides for ``torch.compile``)
and autograd (``torch.library.register_autograd``), whose backward is the op's
own ``*_backward`` op. The public wrappers cast mixed dtypes to one, and in eager
mode reach the same backward ops through plain ``autograd.Function``s (cheaper
per call than the registered autograd of ops with ``Tensor[]`` arguments);
``torch.compile`` traces the registered autograd. Contracts: ``docs/internals.md``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ncp._torch_abi import check_extension

# ncp._C only works with the torch major.minor it was built against: a mismatch raises
# TorchMismatchError (naming both versions) here, before the library is loaded.
check_extension()
from ncp import _C  # noqa: E402,F401  (loads the kernels and the schemas)
from ncp.ops import reference as _reference

_ops = torch.ops.ncp


def _kernel_format(t: Tensor) -> torch.memory_format:
    """The layout the kernels iterate in (same rule as ``ncp::kernel_format`` in csrc/common.h)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty(shape, like: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _empty_stack(k, like: Tensor, fmt: torch.memory_format) -> Tensor:
    """A (K, *like.shape) tensor whose slices are laid out in ``fmt`` (``ncp::empty_stack``)."""
    return _empty((k * like.shape[0], *like.shape[1:]), like, fmt).view(k, *like.shape)


def _error_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels -----------------------------------------------------------
@torch.library.register_fake("ncp::reverse_step")
def _reverse_step_fake(x_t, eps_policy, eps_other, z, coef):
    fmt = _kernel_format(x_t)
    return _empty(x_t.shape, x_t, fmt), _empty_stack(eps_other.shape[0], x_t, fmt)


@torch.library.register_fake("ncp::reverse_step_backward")
def _reverse_step_backward_fake(grad_prev_policy, coef):
    return _empty(grad_prev_policy.shape, grad_prev_policy, _kernel_format(grad_prev_policy))


@torch.library.register_fake("ncp::multiscale_error")
def _multiscale_error_fake(policy, reference, target, weights):
    n = policy[0].shape[0]
    dtype = _error_dtype(policy[0].dtype)
    return policy[0].new_empty((n,), dtype=dtype), policy[0].new_empty((n if reference else 0,), dtype=dtype)


@torch.library.register_fake("ncp::multiscale_error_backward")
def _multiscale_error_backward_fake(grad_err_policy, policy, target, weights):
    return [_empty(p.shape, p, _kernel_format(p)) for p in policy]


# ---- autograd -----------------------------------------------------------------
def _per_sample(c: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against ``like`` (N, ...)."""
    return c.view(-1, *([1] * (like.dim() - 1)))


def _reverse_step_grads(coef: Tensor, needs, grad_policy: Tensor | None, grad_other: Tensor | None):
    """Gradients of (x_t, eps_policy, eps_other, z) given those of (prev_policy, prev_other)."""
    need_x, need_eps, need_other, need_z = needs
    grad_eps = None
    if need_eps and grad_policy is not None:
        grad_eps = _ops.reverse_step_backward(grad_policy, coef)
    grad_x = grad_z = grad_eps_other = None
    # x_t, z and eps_other carry no gradient in training: this rare path is plain PyTorch.
    if (need_x or need_z or need_other) and (grad_policy is not None or grad_other is not None):
        like = grad_policy if grad_policy is not None else grad_other[0]
        total = torch.zeros_like(like, dtype=torch.float32 if like.dtype != torch.float64 else like.dtype)
        if grad_policy is not None:
            total = total + grad_policy
        if grad_other is not None:
            total = total + grad_other.sum(0)
        c = coef.to(total.dtype)
        grad_x = (_per_sample(c[:, 0], total) * total).to(like.dtype) if need_x else None
        grad_z = (_per_sample(c[:, 2], total) * total).to(like.dtype) if need_z else None
        if need_other and grad_other is not None:
            grad_eps_other = (-_per_sample(c[:, 1], grad_other[0]).unsqueeze(0) * grad_other).to(grad_other.dtype)
    return grad_x, grad_eps, grad_eps_other, grad_z


def _multiscale_grads(policy, reference, target, weights, need_p, need_r, need_t, grad_p, grad_r):
    """Gradients of the (policy, reference, target) lists given those of (err_policy, err_reference).

    ``reference`` holds the reference features only when some of them need a gradient.
    """
    grads_p, grads_r, grads_t = [None] * len(need_p), [None] * len(need_r), [None] * len(need_t)
    from_policy = None
    if grad_p is not None and (any(need_p) or any(need_t)):
        from_policy = _ops.multiscale_error_backward(grad_p, policy, target, weights)
        grads_p = [g if need else None for g, need in zip(from_policy, need_p)]
    if any(need_t) or any(need_r):  # not used by training: plain PyTorch
        for i, (t, w) in enumerate(zip(target, weights)):
            g_t = -from_policy[i] if from_policy is not None else torch.zeros_like(t)
            if reference and grad_r is not None:
                scale = _per_sample(grad_r * (2.0 * w / max(t[0].numel(), 1)), t)
                g_r = (scale * (reference[i].to(scale.dtype) - t.to(scale.dtype))).to(t.dtype)
                grads_r[i] = g_r if need_r[i] else None
                g_t = g_t - g_r
            grads_t[i] = g_t if need_t[i] else None
    return grads_p, grads_r, grads_t


# Registered autograd: used by torch.compile and by direct calls of torch.ops.ncp.*.
def _reverse_step_setup(ctx, inputs, output) -> None:
    x_t, _, eps_other, z, coef = inputs
    ctx.save_for_backward(coef)
    if not (x_t.requires_grad or eps_other.requires_grad or z.requires_grad):
        ctx.mark_non_differentiable(output[1])  # training: the no-grad branches stay out of the graph


def _reverse_step_backward(ctx, grad_policy: Tensor | None, grad_other: Tensor | None):
    (coef,) = ctx.saved_tensors
    return (*_reverse_step_grads(coef, ctx.needs_input_grad[:4], grad_policy, grad_other), None)


torch.library.register_autograd("ncp::reverse_step", _reverse_step_backward, setup_context=_reverse_step_setup)


def _multiscale_setup(ctx, inputs, output) -> None:
    policy, reference, target, weights = inputs
    ctx.weights = list(weights)
    ctx.n_scales = len(policy)
    # The reference features are kept only when they need a gradient (never in training).
    ctx.keep_reference = any(r.requires_grad for r in reference)
    ctx.save_for_backward(*policy, *target, *(reference if ctx.keep_reference else ()))
    if not (ctx.keep_reference or any(t.requires_grad for t in target)):
        ctx.mark_non_differentiable(output[1])


def _multiscale_backward(ctx, grad_p: Tensor | None, grad_r: Tensor | None):
    s, saved = ctx.n_scales, ctx.saved_tensors
    need_p, need_r, need_t, _ = ctx.needs_input_grad
    grads = _multiscale_grads(list(saved[:s]), list(saved[2 * s :]), list(saved[s : 2 * s]), ctx.weights,
                              need_p, need_r, need_t, grad_p, grad_r)
    return (*grads, None)


torch.library.register_autograd(
    "ncp::multiscale_error", _multiscale_backward, setup_context=_multiscale_setup
)


# Eager fast path: the same backward ops behind plain autograd.Functions with flat
# arguments. torch.library's autograd for ops with Tensor[] arguments flattens and
# unflattens pytrees on every call (~0.3 ms per forward+backward of five scales,
# more than the GPU time of the SD1.5 shapes).
class _ReverseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, eps_policy, eps_other, z, coef):
        prev_policy, prev_other = _ops.reverse_step(x_t, eps_policy, eps_other, z, coef)
        ctx.save_for_backward(coef)
        ctx.set_materialize_grads(False)
        need_x, _, need_other, need_z, _ = ctx.needs_input_grad
        if not (need_x or need_other or need_z):
            ctx.mark_non_differentiable(prev_other)
        return prev_policy, prev_other

    @staticmethod
    def backward(ctx, grad_policy, grad_other):
        (coef,) = ctx.saved_tensors
        return (*_reverse_step_grads(coef, ctx.needs_input_grad[:4], grad_policy, grad_other), None)


class _MultiscaleError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, n_scales, n_reference, *tensors):
        s, r = n_scales, n_reference
        policy, reference, target = list(tensors[:s]), list(tensors[s : s + r]), list(tensors[s + r :])
        err_p, err_r = _ops.multiscale_error(policy, reference, target, weights)
        needs = ctx.needs_input_grad[3:]
        keep_reference = any(needs[s : s + r])
        ctx.save_for_backward(*policy, *target, *(reference if keep_reference else ()))
        ctx.meta = (weights, s, r)
        ctx.set_materialize_grads(False)
        if not any(needs[s:]):
            ctx.mark_non_differentiable(err_r)
        return err_p, err_r

    @staticmethod
    def backward(ctx, grad_p, grad_r):
        weights, s, r = ctx.meta
        saved, needs = ctx.saved_tensors, ctx.needs_input_grad[3:]
        grads_p, grads_r, grads_t = _multiscale_grads(
            list(saved[:s]), list(saved[2 * s :]), list(saved[s : 2 * s]), weights,
            needs[:s], needs[s : s + r], needs[s + r :], grad_p, grad_r,
        )
        return (None, None, None, *grads_p, *grads_r, *grads_t)


def _eager_autograd(tensors) -> bool:
    """Whether to take the eager fast path (grad needed, not being traced by torch.compile)."""
    return (not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))


# ---- public wrappers ------------------------------------------------------------
def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # no dispatcher call in the common case


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def reverse_step(
    x_t: Tensor, eps_policy: Tensor, eps_other: Tensor, z: Tensor, coef: Tensor
) -> tuple[Tensor, Tensor]:
    """Fused ``x_{t-1} = c_x x_t - c_e eps + sigma z`` for the policy and the K no-grad branches.

    Same contract as :func:`ncp.ops.reference.reverse_step`; mixed input dtypes
    are computed in their promoted dtype and returned in ``x_t``'s.
    """
    dtype = _common_dtype([x_t, eps_policy, eps_other, z])
    args = (_as(x_t, dtype), _as(eps_policy, dtype), _as(eps_other, dtype), _as(z, dtype), _as(coef, torch.float32))
    if _eager_autograd(args[:4]):
        prev_policy, prev_other = _ReverseStep.apply(*args)
    else:
        prev_policy, prev_other = _ops.reverse_step(*args)
    return _as(prev_policy, x_t.dtype), _as(prev_other, x_t.dtype)


def multiscale_error(
    policy: Sequence[Tensor], reference: Sequence[Tensor], target: Sequence[Tensor], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Fused per-sample ``sum_s w_s * mean (x_s - target_s)^2`` for policy and reference.

    Same contract as :func:`ncp.ops.reference.multiscale_error`, all scales and
    both branches in one kernel launch.
    """
    _reference.check_scales(policy, reference, target, weights)
    dtype = _common_dtype([*policy, *reference, *target])
    policy, reference, target = ([_as(t, dtype) for t in ts] for ts in (policy, reference, target))
    weights = [float(w) for w in weights]
    if _eager_autograd([*policy, *reference, *target]):
        return _MultiscaleError.apply(weights, len(policy), len(reference), *policy, *reference, *target)
    return _ops.multiscale_error(policy, reference, target, weights)
