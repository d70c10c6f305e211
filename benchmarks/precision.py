"""Precision of the perceptual path (issue 26, part 3): what fp32, fp16 and bf16 do to NCP's signal.

NCP's signal is the difference of the reverse-step branches, ``x_{t-1}(e) - x_{t-1}(eps) = -c_e(t) (e - eps)``
with ``c_e(t)`` 0.004-0.02 on the SD schedule; bf16's rounding step at ``x ~ 1`` (2^-8) is as large as that.
For one batch of pairs (one timestep per pair, spread over the schedule) this runs the NCP-DPO step in
each precision mode and compares with a float64 run of the same model, inputs and noise:

- ``PL``: relative error of the per-image perceptual error ``PL_theta`` (policy against target);
- ``PL - PL_ref``: relative error of the policy-minus-reference difference (what the loss compares);
- ``d``: relative error of the pair's logit argument ``(PL_theta - PL_ref)(w) - (PL_theta - PL_ref)(l)``;
- ``grad cos``: cosine of the LoRA gradient of the loss with the float64 one, and the norm ratio;

and the same for latent Diffusion-DPO (``ERR``) as the control. Modes (frozen weights, autocast,
``model.perceptual_precision``):

- ``fp32``: everything fp32;
- ``bf16``: bf16 weights and autocast, the reverse step and the encoder in bf16 (ncp's GPU default before);
- ``bf16-autocast``: the same with fp32 frozen weights (what the weights' rounding adds to ``bf16``);
- ``fp16``: the same in fp16 (the NCP authors' training precision);
- ``bf16/enc-fp16``: fp32 frozen weights, the policy under bf16 autocast, the reverse step in fp32 and the
  encoder under fp16 autocast (CPU autocast cannot run fp16 over bf16 weights: its GroupNorm wants fp32
  parameters; CUDA autocast can, its GroupNorm runs in fp32);
- ``bf16/enc-fp32``: fp32 frozen weights, the policy under bf16 autocast, the reverse step and encoder fp32;
- ``bf16/enc-tf32``: ``bf16/enc-fp32`` with TF32 emulated (what an "fp32" encoder gets from cuDNN and cuBLAS
  on an H100 when TF32 is allowed): every Conv2d and Linear rounds its fp32 input and weight to TF32's 10
  mantissa bits (round to nearest even) and accumulates in fp32, in the forward passes (the backward and
  attention's matmuls stay fp32: an optimistic emulation).

Two views: the bundled world's model on its filtered pairs, and a random-weight U-Net of SD1.5's published
config at ``--sd15-latent`` x 8 pixels (256 px by default) on random latents and text states. The policy is
the base with a random LoRA (B scaled by ``--lora-scale``: a LoRA of a trained step's size, so that
``PL_theta != PL_ref``). All on the CPU (TF32 needs a GPU: ``benchmarks/gpu_check.sh``).

    python benchmarks/precision.py                          # both views, mid and authors taps
    python benchmarks/precision.py --views bundle --taps mid

Prints one table per view and tap set and writes benchmarks/results/precision.json with the FLOP share of
the encoder passes in an SD1.5 512 px NCP-DPO step (what running them in another precision costs).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from error_scale import SD15_SCHEDULER, SD15_UNET, randomize_lora  # noqa: E402

# mode: (frozen weight dtype, autocast dtype or None, model.perceptual_precision's encoder dtype or None)
MODES = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16, None),
    "fp16": (torch.float16, torch.float16, None),
    "bf16/enc-fp16": (torch.float32, torch.bfloat16, torch.float16),
    "bf16/enc-fp32": (torch.float32, torch.bfloat16, torch.float32),
    "bf16/enc-tf32": (torch.float32, torch.bfloat16, "tf32"),
}
T_SPREAD = (10, 50, 100, 200, 400, 600, 800, 950)  # one timestep per pair, cycled


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits, round to nearest even), as tensor cores read fp32 inputs."""
    if x.dtype != torch.float32:
        return x
    i = x.contiguous().view(torch.int32)
    return ((i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32(model: torch.nn.Module):
    """Every Conv2d and Linear of ``model`` reads its fp32 input and weight at TF32 precision."""
    def pre(module, args):  # the forward reads TF32; the gradient passes straight through (backward in fp32)
        x = args[0]
        return (x + (tf32_round(x) - x).detach(), *args[1:])

    layers = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    saved = [m.weight.data for m in layers]
    for m in layers:
        m.weight.data = tf32_round(m.weight.data)
    hooks = [m.register_forward_pre_hook(pre) for m in layers]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, w in zip(layers, saved):
            m.weight.data = w


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in ``dtype`` with the LoRA parameters in fp32 (fp64 for the fp64 oracle), as ncp trains them."""
    m = copy.deepcopy(model).to(dtype)
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return m


def run_mode(model, criterion, x0, cond, noise, weight_dtype, autocast_dtype, encoder_dtype) -> dict[str, np.ndarray]:
    """Per-image errors (policy, reference) and the LoRA gradient of one step in one precision mode."""
    from ncp.models import Conditioning
    from ncp.step import StepNoise, branch_errors

    m = cast_model(model, weight_dtype)
    m.train()
    nd = torch.float64 if weight_dtype == torch.float64 else torch.float32  # noise: fp32 as sample_noise draws it
    c = Conditioning(cond.hidden_states.to(weight_dtype))
    sn = StepNoise(noise.t, noise.eps.to(nd), noise.z.to(nd))
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    tf32 = emulated_tf32(m) if encoder_dtype == "tf32" else contextlib.nullcontext()
    criterion = dataclasses.replace(criterion, encoder_dtype=torch.float32 if encoder_dtype == "tf32" else encoder_dtype)
    with ctx, tf32:
        err, ref = branch_errors(criterion, m, m, x0.to(weight_dtype), c, sn)
        b = noise.t.shape[0]
        out = criterion.objective.loss(err[:b], err[b:], ref[:b], ref[b:], **criterion.hyperparameters)
    out.loss.mean().backward()
    grad = torch.cat([p.grad.detach().double().flatten() for n, p in m.named_parameters()
                      if "lora_" in n and p.grad is not None])
    return {"err": err.detach().double().numpy(), "ref": ref.detach().double().numpy(), "grad": grad.numpy()}


def compare(run: dict, oracle: dict, b: int) -> dict[str, float]:
    rel = lambda a, o: float(np.linalg.norm(a - o) / max(np.linalg.norm(o), 1e-300))  # noqa: E731
    diff = lambda r: r["err"] - r["ref"]  # noqa: E731
    d = lambda r: diff(r)[:b] - diff(r)[b:]  # noqa: E731
    g, go = run["grad"], oracle["grad"]
    return {"rel_err": rel(run["err"], oracle["err"]), "rel_err_minus_ref": rel(diff(run), diff(oracle)),
            "rel_d": rel(d(run), d(oracle)),
            "grad_cosine": float(g @ go / max(np.linalg.norm(g) * np.linalg.norm(go), 1e-300)),
            "grad_norm_ratio": float(np.linalg.norm(g) / max(np.linalg.norm(go), 1e-300))}


def measure(model, schedule, x0, cond, noise, taps_name: str, betas: dict[str, float], modes: list[str]) -> dict:
    from ncp.criterion import Criterion

    b = noise.t.shape[0]
    rows: dict[str, dict] = {}
    for objective, beta in betas.items():
        t0 = time.time()
        taps = {"taps": [taps_name]} if objective.startswith("ncp-") else {}
        criterion = Criterion.make(objective, schedule, num_down_blocks=len(model.down_blocks), beta=beta, **taps)
        oracle = run_mode(model, criterion, x0, cond, noise, torch.float64, None, None)
        rows[objective] = {"fp64": {"mean_err": float(oracle["err"].mean()),
                                    "mean_abs_err_minus_ref": float(np.abs(oracle["err"] - oracle["ref"]).mean()),
                                    "s": round(time.time() - t0, 1)}}
        for mode in modes:
            wd, ad, ed = MODES[mode]
            if objective == "dpo" and ed is not None:
                continue  # the encoder's precision does not enter latent DPO
            t0 = time.time()
            res = compare(run_mode(model, criterion, x0, cond, noise, wd, ad, ed), oracle, b)
            rows[objective][mode] = res | {"s": round(time.time() - t0, 1)}
            print(f"    {objective:<8} {mode:<14} grad cos {res['grad_cosine']:.5f}  rel(PL-PL_ref) "
                  f"{res['rel_err_minus_ref']:.2e}  ({rows[objective][mode]['s']} s)", flush=True)
    return rows


def step_noise(n: int, shape: tuple, seed: int):
    from ncp.step import StepNoise

    gen = torch.Generator().manual_seed(seed)
    t = torch.tensor([T_SPREAD[i % len(T_SPREAD)] for i in range(n)])
    return StepNoise(t, torch.randn((n, *shape), generator=gen), torch.randn((n, *shape), generator=gen))


def bundle_view(args, taps_name: str):
    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.trainer import batch_inputs, setup

    overrides = [f"data.batch_size={args.pairs}", "train.report=false", "data.backend=torch", "data.num_workers=0",
                 f"train.output_dir={args.tmp}", "logging.progress=false", "logging.tensorboard=false",
                 "data.absolute_winners=true", "objective.name=ncp-dpo", f"objective.taps=[{taps_name}]"]
    tr = setup(load_config(DEFAULT_CONFIG, overrides))
    randomize_lora(tr.base, args.lora_scale, args.seed)
    x0, cond = batch_inputs(tr, next(iter(tr.source)), torch.Generator().manual_seed(args.seed))
    noise = step_noise(x0.shape[0] // 2, tuple(x0.shape[1:]), args.seed)
    return tr.base, tr.criterion.schedule, x0, cond, noise


def sd15_view(args, taps_name: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from ncp.models import Conditioning
    from ncp.schedule import NoiseSchedule

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora(unet, args.lora_scale, args.seed)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(**SD15_SCHEDULER), torch.device("cpu"))
    n, s = args.sd15_pairs, args.sd15_latent
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn((2 * n, 4, s, s), generator=gen)  # SD latents (scaled) are roughly unit-variance
    cond = Conditioning(torch.randn((n, 77, 768), generator=gen))
    return unet, schedule, x0, cond, step_noise(n, (4, s, s), args.seed)


def encoder_flop_share(taps_name: str) -> dict[str, float]:
    """FLOPs of an SD1.5 512 px NCP-DPO step and the share of them its perceptual encoder passes add."""
    from ncp.flops import step_flops

    ncp = step_flops(SD15_UNET, "sd15", 512, "ncp-dpo", [taps_name])
    dpo = step_flops(SD15_UNET, "sd15", 512, "dpo", ["mid"])
    return {"ncp_dpo_tflop_per_pair": ncp / 1e12, "dpo_tflop_per_pair": dpo / 1e12,
            "encoder_share": (ncp - dpo) / ncp}


def format_table(title: str, rows: dict) -> str:
    lines = [title, f"  {'objective':<9} {'mode':<14} {'rel PL':>9} {'rel PL-PLref':>12} {'rel d':>9} "
                    f"{'grad cos':>9} {'|g|/|g64|':>9}"]
    for objective, modes in rows.items():
        for mode, r in modes.items():
            if mode == "fp64":
                continue
            lines.append(f"  {objective:<9} {mode:<14} {r['rel_err']:9.2e} {r['rel_err_minus_ref']:12.2e} "
                         f"{r['rel_d']:9.2e} {r['grad_cosine']:9.5f} {r['grad_norm_ratio']:9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="bundle,sd15")
    p.add_argument("--taps", default="mid,authors", help="tap presets to measure, comma-separated")
    p.add_argument("--pairs", type=int, default=16, help="bundle view: pairs")
    p.add_argument("--sd15-pairs", type=int, default=2)
    p.add_argument("--sd15-latent", type=int, default=32, help="sd15 view: latent side (x8 pixels)")
    p.add_argument("--lora-scale", type=float, default=0.01, help="random LoRA: B drawn like A times this")
    p.add_argument("--beta-ncp", type=float, default=5000.0, help="NCP-DPO's beta (the authors' scale)")
    p.add_argument("--beta-dpo", type=float, default=5000.0)
    p.add_argument("--modes", default=",".join(MODES), help="precision modes to compare with float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="runs/precision")
    p.add_argument("--out", default=str(HERE / "results" / "precision.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    betas = {"ncp-dpo": args.beta_ncp, "dpo": args.beta_dpo}
    results: dict = {}
    for view in [v for v in args.views.split(",") if v]:
        for taps_name in [t for t in args.taps.split(",") if t]:
            print(f"view {view}, taps {taps_name}", flush=True)
            model, schedule, x0, cond, noise = {"bundle": bundle_view, "sd15": sd15_view}[view](args, taps_name)
            rows = measure(model, schedule, x0, cond, noise, taps_name, betas, args.modes.split(","))
            results[f"{view}/{taps_name}"] = rows
            print(format_table(f"{view}, taps {taps_name}", rows), flush=True)
    flops = {t: encoder_flop_share(t) for t in args.taps.split(",") if t}
    for t, f in flops.items():
        print(f"SD1.5 512 px, taps {t}: NCP-DPO {f['ncp_dpo_tflop_per_pair']:.2f} TFLOP/pair, DPO "
              f"{f['dpo_tflop_per_pair']:.2f}; the encoder passes are {100 * f['encoder_share']:.0f} % of the step")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"results": results, "sd15_512_flops": flops, "modes": {k: [str(x) for x in v] for k, v in MODES.items()},
              "modes_run": args.modes,
              "t_spread": T_SPREAD, "args": vars(args),
              "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
