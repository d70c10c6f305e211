"""Benchmark of the fused ops against eager PyTorch and torch.compile of the reference.

Shapes are those of real NCP steps: SD1.5 at 512 px (latent 4x64x64) and SDXL at
1024 px (latent 4x128x128), `--pairs` pairs (2B images), the reverse step with
K = 2 no-grad branches, and the encoder taps of each preset:
  paper       the last down block's output
  mid         the mid block's output
  multiscale  every down block's output and mid
(SD1.5: block_out_channels 320, 640, 1280, 1280, a 2x downsample after every
down block but the last; SDXL: 320, 640, 1280, downsample after the first two.)
`latent` is the S = 1 error of the latent-space objectives on the noise predictions.

For each op: forward and forward+backward time (median), bytes that must move
(each input read once, each output written once), achieved bandwidth, and its
share of the measured copy bandwidth (`dst.copy_(src)` of a large buffer).
Prints a table and writes JSON (default benchmarks/results/ops.json).

    python benchmarks/ops.py                      # GPU if present, else CPU (reduced: 2 pairs, fp32)
    python benchmarks/ops.py --device cpu --pairs 8 --dtype bf16 --no-compile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ncp.ops import reference

try:
    from ncp.ops import fused
except ImportError as err:  # pragma: no cover
    sys.exit(f"benchmarks/ops.py needs the built extension ncp._C: {err}")

LATENT = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}
TAPS = {  # (C, H, W) of the down block outputs, then mid
    "sd15": [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8)],
    "sdxl": [(320, 64, 64), (640, 32, 32), (1280, 32, 32), (1280, 32, 32)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def preset_shapes(model: str, preset: str) -> list[tuple[int, int, int]]:
    taps = TAPS[model]
    return {"paper": [taps[-2]], "mid": [taps[-1]], "multiscale": taps, "latent": [LATENT[model]]}[preset]


@dataclass
class Row:
    op: str
    model: str
    preset: str
    mode: str  # fwd | fwd+bwd
    shapes: str
    mbytes: float
    fused_ms: float
    eager_ms: float
    compiled_ms: float | None
    fused_gbps: float
    pct_copy: float
    x_eager: float
    x_compiled: float | None


class Timer:
    """Median time of one call. On a GPU each sample times `inner` back-to-back calls between two
    events, as in training, where the host queues work ahead of the GPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int, inner: int = 1):
        self.device, self.reps, self.warmup, self.inner = device, reps, warmup, inner

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Median seconds of one call of fn (after warm-up, which also compiles)."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / self.inner)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes/s of dst.copy_(src) (read + write) over a buffer larger than any cache."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src))  # GPU: 1 GiB, far beyond L2


def step_case(model: str, n: int, dtype, device):
    c, h, w = LATENT[model]
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    x, e, z, others = mk(n, c, h, w), mk(n, c, h, w), mk(n, c, h, w), mk(2, n, c, h, w)
    coef = torch.rand(n, 3, generator=g).to(device)
    elt = x.element_size() * x.numel()
    return (x, e, others, z, coef), {"fwd": (4 + 2 * 2) * elt, "bwd": 2 * elt}, f"{n}x{c}x{h}x{w}, K=2"


def error_case(model: str, preset: str, n: int, dtype, device):
    shapes = preset_shapes(model, preset)
    g = torch.Generator().manual_seed(0)
    mk = lambda s: torch.randn(n, *s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    policy, ref, target = [mk(s) for s in shapes], [mk(s) for s in shapes], [mk(s) for s in shapes]
    elt = sum(p.element_size() * p.numel() for p in policy)
    weights = [1.0 / len(shapes)] * len(shapes)
    desc = " + ".join(f"{c}x{h}x{w}" for c, h, w in shapes)
    return (policy, ref, target, weights), {"fwd": 3 * elt, "bwd": 3 * elt}, f"{n}x[{desc}]"


def run_case(op: str, args, impls: dict[str, Callable], mode: str, timer: Timer, device) -> dict[str, float]:
    """Median seconds per implementation for one op and mode."""
    out = {}
    if op == "reverse_step":
        x, e, others, z, coef = args
        grad_out = torch.randn_like(x)
        for name, fn in impls.items():
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        fn(x, e, others, z, coef)
            else:
                leaf = e.detach().requires_grad_(True)

                def call(fn=fn, leaf=leaf):
                    torch.autograd.grad(fn(x, leaf, others, z, coef)[0], leaf, grad_out)
            out[name] = timer(call)
    else:
        policy, ref, target, weights = args
        grad_out = torch.rand(policy[0].shape[0], device=device)
        for name, fn in impls.items():
            if mode == "fwd":
                def call(fn=fn):
                    with torch.no_grad():
                        fn(policy, ref, target, weights)
            else:
                leaves = [p.detach().requires_grad_(True) for p in policy]

                def call(fn=fn, leaves=leaves):
                    torch.autograd.grad(fn(leaves, ref, target, weights)[0], leaves, grad_out)
            out[name] = timer(call)
    return out


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
            info["device"] = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name"))
        except Exception:  # noqa: BLE001
            info["device"] = platform.processor()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per batch (default: 8 on GPU, 2 on CPU)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--models", default="sd15,sdxl")
    # `mid` has the shape of `paper` in both models (1280x8x8 / 1280x32x32): not run by default.
    ap.add_argument("--presets", default="latent,paper,multiscale")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ops.json"))
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gpu = device.type == "cuda"
    pairs = a.pairs or (8 if gpu else 2)
    dtype = DTYPES[a.dtype or ("bf16" if gpu else "fp32")]
    timer = Timer(device, reps=a.reps or (20 if gpu else 5), warmup=3 if gpu else 2, inner=10 if gpu else 1)
    n = 2 * pairs
    copy_bw = copy_bandwidth(device, timer)

    impls = {
        "reverse_step": {"fused": fused.reverse_step, "eager": reference.reverse_step},
        "multiscale_error": {"fused": fused.multiscale_error, "eager": reference.multiscale_error},
    }
    rows: list[Row] = []
    result = {
        "machine": machine(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "pairs": pairs, "copy_GBps": copy_bw / 1e9, "rows": [],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cases = []
    for model in a.models.split(","):
        cases.append(("reverse_step", model, "-", *step_case(model, n, dtype, device)))
        for preset in a.presets.split(","):
            cases.append(("multiscale_error", model, preset, *error_case(model, preset, n, dtype, device)))
    for op, model, preset, args, nbytes, desc in cases:
        for mode in ("fwd", "fwd+bwd"):
            fns = dict(impls[op])
            if not a.no_compile:
                torch._dynamo.reset()  # a fresh graph per shape and mode: no recompile limits
                fns["compiled"] = torch.compile(getattr(reference, op), fullgraph=True)
            t = run_case(op, args, fns, mode, timer, device)
            moved = nbytes["fwd"] + (nbytes["bwd"] if mode == "fwd+bwd" else 0)
            row = Row(
                op=op, model=model, preset=preset, mode=mode, shapes=desc, mbytes=moved / 1e6,
                fused_ms=t["fused"] * 1e3, eager_ms=t["eager"] * 1e3,
                compiled_ms=t["compiled"] * 1e3 if "compiled" in t else None,
                fused_gbps=moved / t["fused"] / 1e9, pct_copy=100 * moved / t["fused"] / copy_bw,
                x_eager=t["eager"] / t["fused"], x_compiled=t["compiled"] / t["fused"] if "compiled" in t else None,
            )
            rows.append(row)
            print_row(row, header=len(rows) == 1)
            result["rows"].append(asdict(row))
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every row: a timeout keeps them
    print(f"\n{result['machine']['device']}, {result['dtype']}, {pairs} pairs; copy bandwidth "
          f"{copy_bw / 1e9:.1f} GB/s; speed-ups are (baseline time / fused time); wrote {a.out}")


def print_row(r: Row, header: bool) -> None:
    if header:
        print(f"{'op':<17} {'model':<5} {'preset':<10} {'mode':<8} {'MB':>8} {'fused ms':>9} {'eager ms':>9} "
              f"{'comp. ms':>9} {'x eager':>8} {'x comp.':>8} {'GB/s':>7} {'%copy':>6}")
    comp = f"{r.compiled_ms:9.3f}" if r.compiled_ms is not None else f"{'-':>9}"
    xc = f"{r.x_compiled:8.2f}" if r.x_compiled is not None else f"{'-':>8}"
    print(f"{r.op:<17} {r.model:<5} {r.preset:<10} {r.mode:<8} {r.mbytes:8.1f} {r.fused_ms:9.3f} {r.eager_ms:9.3f} "
          f"{comp} {r.x_eager:8.2f} {xc} {r.fused_gbps:7.1f} {r.pct_copy:6.1f}", flush=True)


if __name__ == "__main__":
    main()
