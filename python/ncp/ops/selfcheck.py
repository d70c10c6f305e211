"""``python -m ncp.ops.selfcheck [--device cpu|cuda|all]``: does this install's ``ncp._C`` work?

Checks, on an installed ncp (a wheel, an editable install or a source tree):

1. ``ncp._C`` loads, and the torch it was built against (its build record) matches
   the running torch's major.minor (:mod:`ncp._torch_abi`);
2. the fused kernels are registered for each device checked (``cpu``; ``cuda``
   when asked for, or with ``all`` on a machine with a GPU);
3. on each of them, both fused ops (``reverse_step``, ``multiscale_error``) agree
   with the pure-PyTorch reference (``ncp.ops.reference``, in float64) on small
   random inputs, contiguous and channels-last, forward and backward (fp32,
   ``rtol 1e-5``: the tolerance of tests/test_ops.py).

Prints one line per check and exits 1 (with what failed) on any failure, so a
script or CI can run it after installing the wheels. Seconds on a CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch

RTOL, ATOL = 1e-5, 1e-6


def _inputs(device: str, channels_last: bool, k: int = 2, shape=(3, 4, 6, 5), seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(s):
        t = torch.randn(s, generator=g).to(device)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    x, eps, z = randn(shape), randn(shape), randn(shape)
    others = torch.stack([randn(shape) for _ in range(k)])
    coef = (torch.rand(shape[0], 3, generator=g) + 0.5).to(device)
    scales = [(4, 6, 5), (8, 3, 3), (5, 1, 1)]
    target = [randn((shape[0], *s)) for s in scales]
    policy = [(t + 0.1 * randn(t.shape)) for t in target]
    ref = [(t + 0.2 * randn(t.shape)) for t in target]
    return (x, eps, others, z, coef), (policy, ref, target, [1.0, 0.5, 0.25])


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    torch.testing.assert_close(got.double(), want.double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def check_device(device: str, channels_last: bool) -> None:
    """Fused vs float64 reference, forward and backward, for both ops on ``device``."""
    from ncp.ops import fused, reference

    (x, eps, others, z, coef), (policy, ref, target, weights) = _inputs(device, channels_last)

    eps_f = eps.clone().requires_grad_(True)
    prev, prev_other = fused.reverse_step(x, eps_f, others, z, coef)
    eps_r = eps.double().requires_grad_(True)
    prev_r, prev_other_r = reference.reverse_step(x.double(), eps_r, others.double(), z.double(), coef)
    _close("reverse_step prev_policy", prev, prev_r)
    _close("reverse_step prev_other", prev_other, prev_other_r)
    up = torch.randn(prev.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (prev * up).sum().backward()
    (prev_r * up.double()).sum().backward()
    _close("reverse_step grad eps_policy", eps_f.grad, eps_r.grad)

    pol_f = [p.clone().requires_grad_(True) for p in policy]
    err, err_ref = fused.multiscale_error(pol_f, ref, target, weights)
    pol_r = [p.double().requires_grad_(True) for p in policy]
    err_r, err_ref_r = reference.multiscale_error(pol_r, [r.double() for r in ref], [t.double() for t in target], weights)
    _close("multiscale_error policy", err, err_r)
    _close("multiscale_error reference", err_ref, err_ref_r)
    w = torch.linspace(0.5, 1.5, err.shape[0], device=device)
    (err * w).sum().backward()
    (err_r * w.double()).sum().backward()
    for i, (gf, gr) in enumerate(zip(pol_f, pol_r)):
        _close(f"multiscale_error grad policy[{i}]", gf.grad, gr.grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncp.ops.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="devices to check: all = cpu, and cuda when a GPU is visible (default)")
    args = parser.parse_args(argv)

    import ncp
    import ncp.ops
    from ncp import _torch_abi

    print(f"ncp {ncp.__version__} from {ncp.__file__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})")
    if not ncp.ops.HAVE_EXTENSION:
        print("FAIL: ncp._C is not built or does not load (see the warning above)", file=sys.stderr)
        return 1
    record = _torch_abi.read_record()
    if record is None:
        print(f"FAIL: ncp._C has no build record ({_torch_abi.record_path()}): rebuild ncp", file=sys.stderr)
        return 1
    print(f"ncp._C built against torch {record['torch']} (CUDA {record['torch_cuda']}), "
          f"CUDA kernels: {record['cuda_kernels']}: matches the running torch")

    devices = ["cpu", "cuda"] if args.device == "all" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "all" else [args.device])
    failed = 0
    # The kernels ncp._C registered (not ncp.ops.FUSED_DEVICES, which NCP_OPS=reference empties).
    built = [d for d in ("cpu", "cuda") if torch._C._dispatch_has_kernel_for_dispatch_key("ncp::reverse_step", d.upper())]
    for device in devices:
        if device not in built:
            print(f"FAIL {device}: ncp._C has no kernels for it (it has: {', '.join(built) or 'none'})", file=sys.stderr)
            failed += 1
            continue
        for channels_last in (False, True):
            label = f"{device}, {'channels-last' if channels_last else 'contiguous'}"
            try:
                check_device(device, channels_last)
            except Exception as err:  # noqa: BLE001  (each failure is reported, then the exit code says so)
                print(f"FAIL {label}: {type(err).__name__}: {err}", file=sys.stderr)
                failed += 1
            else:
                print(f"ok   {label}: reverse_step and multiscale_error match the reference, forward and backward")
    if failed:
        print(f"selfcheck: {failed} check(s) FAILED", file=sys.stderr)
        return 1
    print("selfcheck: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
