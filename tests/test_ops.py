"""The fused ops of ``ncp._C`` against float64 oracles, diffusers, and torch's op checks.

Each value test runs on the CPU and, marked ``cuda``, on a GPU. Oracles: the
pure-PyTorch reference (``ncp.ops.reference``) evaluated in float64 on the same
inputs. Tolerances: fp32 ``rtol 1e-5``; bf16/fp16 "no worse than twice plain
PyTorch computing in that dtype".
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ncp.ops
from ncp.ops import reference

fused = ncp.ops.fused  # None when the extension is not built (the tests below then skip)
needs_ext = pytest.mark.skipif(fused is None, reason="ncp._C is not built (NCP_NO_EXTENSION=1?)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW = [torch.bfloat16, torch.float16]


# ---- inputs -----------------------------------------------------------------------
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, device, dtype=torch.float32, g=None, channels_last=False) -> torch.Tensor:
    t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _coef(n: int, device) -> torch.Tensor:
    """Coefficients of real DDPM steps (SD's scaled-linear betas) at random t >= 1."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = torch.randint(1, 1000, (n,), generator=_gen(n))
    beta, alpha, a_t, a_prev = betas[t], 1 - betas[t], abar[t], abar[t - 1]
    c_e = beta / ((1 - a_t).sqrt() * alpha.sqrt())
    sigma = ((1 - a_prev) / (1 - a_t) * beta).sqrt()
    return torch.stack([alpha.rsqrt(), c_e, sigma], 1).float().to(device)


def _step_inputs(shape, k, device, dtype=torch.float32, channels_last=False, seed=0):
    g = _gen(seed)
    x, e, z = (_randn(shape, device, dtype, g, channels_last) for _ in range(3))
    others = torch.stack([_randn(shape, device, dtype, g, channels_last) for _ in range(k)])
    return x, e, others, z, _coef(shape[0], device)


def _features(shapes, n, device, dtype=torch.float32, channels_last=False, seed=0):
    """Policy, reference and target lists; the policy close to the target, as in training."""
    g = _gen(seed)
    target = [_randn((n, *s), device, dtype, g, channels_last) for s in shapes]
    policy = [(t.float() + 0.1 * _randn(t.shape, device, g=g)).to(dtype) for t in target]
    ref = [(t.float() + 0.2 * _randn(t.shape, device, g=g)).to(dtype) for t in target]
    if channels_last:
        policy = [p.contiguous(memory_format=torch.channels_last) for p in policy]
        ref = [r.contiguous(memory_format=torch.channels_last) for r in ref]
    return policy, ref, target


def _f64(ts):
    return [t.double() for t in ts]


SCALES_1 = [(4, 7, 5)]
SCALES_5 = [(3, 7, 5), (8, 4, 3), (16, 2, 2), (16, 2, 2), (5, 1, 1)]  # odd sizes, a 1x1 map
SCALES_SD = [(32, 8, 8), (64, 4, 4), (64, 2, 2)]


# ---- reverse_step -------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,k,channels_last",
    [((1, 3, 7, 5), 1, False), ((4, 4, 8, 8), 2, False), ((3, 4, 7, 5), 2, True), ((2, 4, 33, 17), 1, True)],
)
def test_reverse_step_fp32_matches_float64(device, shape, k, channels_last):
    args = _step_inputs(shape, k, device, channels_last=channels_last)
    got = fused.reverse_step(*args)
    want = reference.reverse_step(*(a.double() for a in args[:4]), args[4])
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt)
    assert all(o.is_contiguous(memory_format=fmt) for o in got[1])


def _plain_step(x, e, others, z, coef):
    """Plain PyTorch, every operation in the inputs' dtype (the bf16/fp16 baseline)."""
    c = coef.to(x.dtype).view(-1, 3, 1, 1, 1)
    base = c[:, 0] * x + c[:, 2] * z
    return base - c[:, 1] * e, base.unsqueeze(0) - c[:, 1].unsqueeze(0) * others


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_reverse_step_low_precision_within_twice_plain(device, dtype):
    args = _step_inputs((4, 4, 16, 16), 2, device, dtype)
    truth = reference.reverse_step(*(a.double() for a in args[:4]), args[4])
    got, plain = fused.reverse_step(*args), _plain_step(*args)
    for g, p, w in zip(got, plain, truth):
        assert g.dtype == dtype
        err, err_plain = (g.double() - w).abs().max(), (p.double() - w).abs().max()
        assert err <= 2 * err_plain, f"{dtype}: fused {err:.3g} vs plain {err_plain:.3g}"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_mixed_dtypes_as_reference(device):
    x, e, others, z, coef = _step_inputs((2, 4, 6, 6), 2, device)
    e, others = e.bfloat16(), others.bfloat16()  # bf16 U-Net outputs, fp32 latents
    for g, w in zip(fused.reverse_step(x, e, others, z, coef), reference.reverse_step(x, e, others, z, coef)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_backward_is_minus_c_e_times_grad(device):
    x, e, others, z, coef = _step_inputs((3, 3, 7, 5), 2, device, channels_last=True)
    e.requires_grad_(True)
    prev_policy, prev_other = fused.reverse_step(x, e, others, z, coef)
    grad_out = _randn(prev_policy.shape, device, g=_gen(9))
    (grad,) = torch.autograd.grad(prev_policy, e, grad_out)
    want = -coef[:, 1].view(-1, 1, 1, 1).double() * grad_out.double()
    torch.testing.assert_close(grad.double(), want, rtol=1e-6, atol=1e-7)
    assert not prev_other.requires_grad  # no grad flows into the no-grad branches


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_gradcheck_float64(device):
    x, e, others, z, coef = _step_inputs((2, 3, 4, 3), 2, device, torch.float64)
    inputs = [t.requires_grad_(True) for t in (x, e, others, z)]  # all of them: the rare paths too
    assert torch.autograd.gradcheck(lambda *a: fused.reverse_step(*a, coef), inputs)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_matches_diffusers_ddpm_step(device):
    from diffusers import DDPMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          variance_type="fixed_small", clip_sample=False)
    betas, abar = sched.betas.double(), sched.alphas_cumprod.double()
    for t in (1, 2, 10, 500, 999):
        x, eps = _randn((2, 4, 8, 8), device, g=_gen(t)), _randn((2, 4, 8, 8), device, g=_gen(t + 1))
        want = sched.step(eps, t, x, generator=torch.Generator(device).manual_seed(t)).prev_sample
        z = randn_tensor(x.shape, generator=torch.Generator(device).manual_seed(t), device=x.device, dtype=x.dtype)
        beta, alpha = betas[t], 1 - betas[t]
        c_e = beta / ((1 - abar[t]).sqrt() * alpha.sqrt())
        sigma = ((1 - abar[t - 1]) / (1 - abar[t]) * beta).sqrt()
        coef = torch.stack([alpha.rsqrt(), c_e, sigma]).float().expand(2, 3).contiguous().to(device)
        got, _ = fused.reverse_step(x, eps, eps.unsqueeze(0), z, coef)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_reverse_step_rejects_bad_shapes(device):
    x, e, others, z, coef = _step_inputs((2, 4, 4, 4), 1, device)
    with pytest.raises(RuntimeError, match="eps_other must be"):
        torch.ops.ncp.reverse_step(x, e, others[:, :1], z, coef)
    with pytest.raises(RuntimeError, match="coef must be"):
        torch.ops.ncp.reverse_step(x, e, others, z, coef[:1])


# ---- multiscale_error ----------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shapes,n,channels_last",
    [(SCALES_1, 1, False), (SCALES_5, 3, False), (SCALES_5, 2, True), (SCALES_SD, 4, True)],
)
def test_multiscale_error_fp32_matches_float64(device, shapes, n, channels_last):
    policy, ref, target = _features(shapes, n, device, channels_last=channels_last)
    weights = [1.0 / len(shapes) + 0.1 * i for i in range(len(shapes))]
    got_p, got_r = fused.multiscale_error(policy, ref, target, weights)
    want_p, want_r = reference.multiscale_error(_f64(policy), _f64(ref), _f64(target), weights)
    assert got_p.dtype == got_r.dtype == torch.float32 and got_p.shape == (n,)
    torch.testing.assert_close(got_p.double(), want_p, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_r.double(), want_r, rtol=1e-5, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_error_without_reference(device):
    policy, _, target = _features(SCALES_5, 2, device)
    err_p, err_r = fused.multiscale_error(policy, [], target, [0.2] * 5)
    assert err_r.shape == (0,) and err_r.dtype == torch.float32
    torch.testing.assert_close(err_p.double(), reference.multiscale_error(_f64(policy), [], _f64(target), [0.2] * 5)[0],
                               rtol=1e-5, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_error_mixed_layouts(device):
    """Channels-last policy against a contiguous target (and the other way round)."""
    policy, ref, target = _features(SCALES_SD, 2, device)
    policy = [p.contiguous(memory_format=torch.channels_last) for p in policy]
    got = fused.multiscale_error(policy, ref, target, [0.5, 0.25, 0.25])
    want = reference.multiscale_error(_f64(policy), _f64(ref), _f64(target), [0.5, 0.25, 0.25])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=0)


def _plain_error(policy, ref, target, weights):
    """Plain PyTorch in the features' dtype (the bf16/fp16 baseline)."""
    def err(xs):
        return sum(w * (x - t).pow(2).flatten(1).mean(1) for x, t, w in zip(xs, target, weights))
    return err(policy), err(ref)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_multiscale_error_low_precision_within_twice_plain(device, dtype):
    policy, ref, target = _features(SCALES_SD, 4, device, dtype)
    weights = [1 / 3] * 3
    truth = reference.multiscale_error(_f64(policy), _f64(ref), _f64(target), weights)
    got, plain = fused.multiscale_error(policy, ref, target, weights), _plain_error(policy, ref, target, weights)
    for g, p, w in zip(got, plain, truth):
        assert g.dtype == torch.float32
        err, err_plain = (g.double() - w).abs().max(), (p.double() - w).abs().max()
        assert err <= 2 * err_plain, f"{dtype}: fused {err:.3g} vs plain {err_plain:.3g}"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiscale_error_backward_matches_reference(device, dtype):
    policy, ref, target = _features(SCALES_5, 3, device, dtype, channels_last=True)
    weights = [0.1, 0.2, 0.3, 0.2, 0.2]
    grad_out = torch.rand(3, generator=_gen(5)).to(device)
    p_fused = [p.detach().requires_grad_(True) for p in policy]
    p_ref = [p.detach().double().requires_grad_(True) for p in policy]
    grads = torch.autograd.grad(fused.multiscale_error(p_fused, ref, target, weights)[0], p_fused, grad_out)
    want = torch.autograd.grad(reference.multiscale_error(p_ref, _f64(ref), _f64(target), weights)[0], p_ref,
                               grad_out.double())
    for g, w, p in zip(grads, want, policy):
        assert g.dtype == dtype and g.shape == p.shape
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(g.double(), w, **tol)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_error_gradcheck_float64(device):
    policy, ref, target = _features([(3, 4, 3), (2, 2, 1)], 2, device, torch.float64)
    tensors = [t.requires_grad_(True) for t in (*policy, *ref, *target)]  # all: the rare paths too

    def fn(*ts):
        return fused.multiscale_error(list(ts[:2]), list(ts[2:4]), list(ts[4:]), [0.7, 0.3])

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradcheck(
        lambda *ts: fused.multiscale_error(list(ts[:2]), [], list(ts[2:]), [0.7, 0.3])[0],
        [*tensors[:2], *tensors[4:]],
    )


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_registered_autograd_matches_eager_fast_path(device):
    """torch.ops.ncp.* (the autograd torch.compile traces) and the wrappers' fast path agree."""
    x, e, others, z, coef = _step_inputs((2, 3, 5, 4), 2, device)
    grads = []
    for call in (torch.ops.ncp.reverse_step, fused.reverse_step):
        leaf = e.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(call(x, leaf, others, z, coef)[0].square().sum(), leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    policy, ref, target = _features(SCALES_5, 2, device)
    grads = []
    for call in (torch.ops.ncp.multiscale_error, fused.multiscale_error):
        leaves = [p.clone().requires_grad_(True) for p in policy]
        err_p, err_r = call(leaves, ref, target, [0.2] * 5)
        assert not err_r.requires_grad
        grads.append(torch.autograd.grad(err_p.square().sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_multiscale_error_rejects_bad_lists(device):
    policy, ref, target = _features(SCALES_SD, 2, device)
    with pytest.raises(ValueError, match="one policy, target and weight per scale"):
        fused.multiscale_error(policy, ref, target, [1.0])
    with pytest.raises(RuntimeError, match="target\\[1\\] has shape"):
        torch.ops.ncp.multiscale_error(policy, ref, [target[0], target[0], target[2]], [1.0] * 3)


@needs_ext
def test_results_do_not_depend_on_thread_count():
    policy, ref, target = _features([(64, 32, 32), (128, 16, 16)], 4, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.multiscale_error(policy, ref, target, [0.5, 0.5])
        torch.set_num_threads(max(2, threads))
        many = fused.multiscale_error(policy, ref, target, [0.5, 0.5])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


# ---- torch.library and torch.compile ---------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, e, others, z, coef = _step_inputs((2, 3, 7, 5), 2, device, channels_last=True)
    e.requires_grad_(True)
    torch.library.opcheck(torch.ops.ncp.reverse_step.default, (x, e, others, z, coef))
    torch.library.opcheck(torch.ops.ncp.reverse_step_backward.default, (x, coef))
    policy, ref, target = _features(SCALES_5, 2, device)
    policy = [p.requires_grad_(True) for p in policy]
    torch.library.opcheck(torch.ops.ncp.multiscale_error.default, (policy, ref, target, [0.2] * 5))
    torch.library.opcheck(torch.ops.ncp.multiscale_error.default, (policy, [], target, [0.2] * 5))
    grad = torch.rand(2, device=device)
    torch.library.opcheck(torch.ops.ncp.multiscale_error_backward.default,
                          (grad, [p.detach() for p in policy], target, [0.2] * 5))


def _ncp_step(x, e, others, z, coef):
    """A miniature NCP step: reverse step, two 'encoder' taps per branch, per-sample errors."""
    prev_p, prev_o = ncp.ops.reverse_step(x, e, others, z, coef)

    def taps(h):
        return [torch.tanh(h), torch.nn.functional.avg_pool2d(h, 2)]

    err_p, err_r = ncp.ops.multiscale_error(taps(prev_p), taps(prev_o[0]), taps(prev_o[1]), [0.5, 0.5])
    return (err_p - err_r).sum()


@needs_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph_through_the_ops(device):
    """Forward and backward traced as one graph (CPU: aot_eager, to keep it fast; GPU: inductor)."""
    x, e, others, z, coef = _step_inputs((2, 4, 8, 8), 2, device)
    e_eager, e_comp = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    loss = _ncp_step(x, e_eager, others, z, coef)
    loss.backward()
    torch._dynamo.reset()
    compiled = torch.compile(_ncp_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x, e_comp, others, z, coef)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e_comp.grad, e_eager.grad, rtol=1e-5, atol=1e-7)


# ---- selection and fallback ---------------------------------------------------------
@pytest.mark.cuda
def test_cuda_kernels_are_built():
    """On a GPU the fused CUDA kernels must run (otherwise the cuda tests above prove nothing)."""
    assert "cuda" in ncp.ops.FUSED_DEVICES, "ncp._C was built without CUDA kernels"


def test_extension_built_unless_disabled():
    if os.environ.get("NCP_NO_EXTENSION") == "1":
        pytest.skip("NCP_NO_EXTENSION=1")
    assert ncp.ops.HAVE_EXTENSION, "ncp._C is not built: pip install --no-build-isolation -e ."
    assert "cpu" in ncp.ops.FUSED_DEVICES or os.environ.get("NCP_OPS") == "reference"


def test_missing_extension_falls_back_with_one_notice():
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['ncp._C'] = None  # as if the extension were not built\n"
        "import torch, ncp.ops\n"
        "assert not ncp.ops.HAVE_EXTENSION and not ncp.ops.FUSED_DEVICES\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "for _ in range(3):\n"
        "    p, o = ncp.ops.reverse_step(x, x, x[None], x, torch.ones(2, 3))\n"
        "    e, r = ncp.ops.multiscale_error([x], [], [x], [1.0])\n"
        "assert torch.equal(p, x) and r.shape == (0,)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("ncp._C is not built") == 1, out.stderr
