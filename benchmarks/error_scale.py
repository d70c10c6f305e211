"""How large are the preference logits at each timestep? (issue 15, part 1)

For a fixed set of pairs and each timestep t of a grid (one t for the whole
batch, the same noise for every t), this measures per pair

    d_latent   = (ERR_theta(w) - ERR_ref(w)) - (ERR_theta(l) - ERR_ref(l))   # Diffusion-DPO
    d_ncp      = (PL_theta(w)  - PL_ref(w))  - (PL_theta(l)  - PL_ref(l))    # NCP-DPO, paper form
    d_ncp_coef = d_ncp / c_e(t)^2                                              # objective.error_scale=coef
    d_ncp_log  = the same with log PL                                          # objective.error_scale=log
    d_ncp_log_t = w(t) d_ncp_log, w(t) calibrated on the same pairs            # objective.error_scale=log_t

and prints, per t, the median and the maximum of |beta/2 d| for each form
(the logit of each objective at the betas given), and the spread of the medians
across t (max / min): one beta fits every t only when that spread is small.

Two views:
- ``bundle``: the bundled world's model with a trained LoRA (``--lora``), on
  the bundled pairs (the model users train by default);
- ``sd15``: a random-weight U-Net of SD1.5's published config (860M parameters)
  at a small latent size, with a random LoRA (peft's non-zero init), on random
  latents and text states: a second view, from a large encoder.

    python benchmarks/error_scale.py --lora runs/quality/ncp-dpo-full-auto-s0/step-001500
    python benchmarks/error_scale.py --views sd15 --sd15-latent 16
    python benchmarks/error_scale.py --views bundle,sd15 --taps authors --random-lora-scale 0.01 --out ...

``--taps`` picks the encoder taps of the NCP forms (``mid``, the SD1.5 default, or ``authors``: the NCP
authors' concatenation of conv_in, every down block and mid). Without ``--lora`` the bundle view draws a
random LoRA (``--random-lora-scale``), as the sd15 view always does: the logits then measure a random
direction of the policy's size, not a trained one, so compare forms within one run, not across runs.

Writes benchmarks/results/error_scale.json and error_scale.png.
"""
from __future__ import annotations

import argparse
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

T_GRID = (1, 5, 20, 50, 100, 200, 400, 600, 800, 999)
FORMS = ("latent", "ncp", "ncp_coef", "ncp_log", "ncp_log_t", "latent_log")

# SD1.5's published U-Net config (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def pair_differences(unet, base, criterion, x0, cond, t: int, eps, z, log_t_table) -> dict[str, np.ndarray]:
    """d (policy minus reference, winner minus loser) of every form, per pair, at one t; ``criterion``: the
    ncp-dpo one (its taps), compared with latent DPO on the same schedule."""
    from ncp.criterion import Criterion
    from ncp.step import StepNoise, branch_errors, scale_errors

    b = eps.shape[0]
    schedule = criterion.schedule
    noise = StepNoise(torch.full((b,), t, dtype=torch.long), eps, z)
    out = {}
    with torch.no_grad():
        for space, crit in (("latent", Criterion.make("dpo", schedule)), ("ncp", criterion)):
            err, ref = branch_errors(crit, unet, base, x0, cond, noise)
            for suffix, scale in (("", "paper"), ("_log", "log")):
                e, r = scale_errors(err.double(), scale), scale_errors(ref.double(), scale)
                out[space + suffix] = ((e[:b] - r[:b]) - (e[b:] - r[b:])).numpy()
    out["ncp_coef"] = out["ncp"] * float(schedule.noise_coefficient_table().double()[t])
    out["ncp_log_t"] = out["ncp_log"] * float(log_t_table[t])
    return out


def measure(unet, base, criterion, x0, cond, t_grid, seed: int) -> dict[int, dict]:
    from ncp.timestep_scale import calibrate

    b = x0.shape[0] // 2
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((b, *x0.shape[1:]), generator=gen)
    z = torch.randn((b, *x0.shape[1:]), generator=gen)
    table = calibrate(criterion, unet, base, x0, cond, torch.Generator().manual_seed(seed))
    res = {}
    for t in t_grid:
        t0 = time.time()
        res[t] = pair_differences(unet, base, criterion, x0, cond, t, eps, z, table)
        print(f"  t={t:4d}  ({time.time() - t0:.1f}s)", flush=True)
    return res


def randomize_lora(unet, scale: float, seed: int) -> None:
    """B of every LoRA layer drawn like A (peft's kaiming-uniform) times ``scale``: policy != reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                bound = 1.0 / max(1, p.shape[1]) ** 0.5
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound * scale)


def bundle_view(args):
    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.trainer import batch_inputs, setup

    overrides = [f"data.batch_size={args.pairs}", "train.report=false", "data.backend=torch", "data.num_workers=0",
                 f"train.output_dir={args.tmp}", "logging.progress=false", "logging.tensorboard=false",
                 f"data.absolute_winners={'true' if args.filtered else 'false'}"]
    overrides += ["objective.name=ncp-dpo", f"objective.taps=[{args.taps}]"]
    if args.lora:
        overrides.append(f"lora.init_from={args.lora}")
    tr = setup(load_config(DEFAULT_CONFIG, overrides))
    if not args.lora:
        randomize_lora(tr.base, args.random_lora_scale, args.seed)
    x0, cond = batch_inputs(tr, next(iter(tr.source)), torch.Generator().manual_seed(args.seed))
    tr.unet.eval()
    return measure(tr.unet, tr.base, tr.criterion, x0, cond, args.t, args.seed)


def sd15_view(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from ncp.criterion import Criterion
    from ncp.models import Conditioning
    from ncp.schedule import NoiseSchedule

    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    # peft's init_lora_weights=False draws B at random too: policy != reference from the start
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    for name, p in unet.named_parameters():  # a LoRA step's size, not the init's: scale B down
        if "lora_B" in name:
            p.data.mul_(args.sd15_lora_scale)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(**SD15_SCHEDULER), torch.device("cpu"))
    n, s = args.sd15_pairs, args.sd15_latent
    gen = torch.Generator().manual_seed(args.seed + 1)
    x0 = torch.randn((2 * n, 4, s, s), generator=gen)  # SD latents (scaled) are roughly unit-variance
    cond = Conditioning(torch.randn((n, 77, 768), generator=gen))
    criterion = Criterion.make("ncp-dpo", schedule, taps=[args.taps], num_down_blocks=len(unet.down_blocks))
    return measure(unet, unet, criterion, x0, cond, args.t, args.seed)


def summarise(res: dict[int, dict], betas: dict[str, float]) -> dict:
    rows = {}
    for t, d in res.items():
        rows[t] = {}
        for form in FORMS:
            logit = np.abs(0.5 * betas[form] * d[form])
            rows[t][form] = {"median_abs_logit": float(np.median(logit)), "p90_abs_logit": float(np.quantile(logit, 0.9)),
                             "max_abs_logit": float(logit.max()), "median_abs_d": float(np.median(np.abs(d[form]))),
                             "max_over_median": float(logit.max() / max(np.median(logit), 1e-300))}
    spread = {}
    latent_level = float(np.median([rows[t]["latent"]["median_abs_logit"] for t in rows]))
    for form in FORMS:
        med = [rows[t][form]["median_abs_logit"] for t in rows]
        # the beta at which this form's typical logit (median over t of the median |logit|) equals latent DPO's
        level = float(np.median(med))
        spread[form] = {"median_spread_across_t": float(max(med) / max(min(med), 1e-300)),
                        "worst_max_over_median": float(max(rows[t][form]["max_over_median"] for t in rows)),
                        "beta_matching_latent": betas[form] * latent_level / max(level, 1e-300)}
    return {"per_t": {str(t): r for t, r in rows.items()}, "spread": spread, "betas": betas}


def format_table(view: str, s: dict) -> str:
    head = f"{'t':>5} " + " ".join(f"{f + ' med/max':>23}" for f in FORMS)
    lines = [f"[{view}] |logit| = |beta/2 d| per pair; betas {s['betas']}", head]
    for t, r in s["per_t"].items():
        lines.append(f"{t:>5} " + " ".join(f"{r[f]['median_abs_logit']:>11.3g} /{r[f]['max_abs_logit']:>10.3g}"
                                           for f in FORMS))
    lines.append(f"{'spread':>5} " + " ".join(f"{s['spread'][f]['median_spread_across_t']:>11.3g}x"
                                              f"{s['spread'][f]['worst_max_over_median']:>10.3g}x" for f in FORMS))
    lines.append("  (spread: max/min over t of the median |logit|, then the worst max/median within one t)")
    lines.append("beta at which each form's median |logit| (median over t) equals latent DPO's: "
                 + ", ".join(f"{f} {s['spread'][f]['beta_matching_latent']:.3g}" for f in FORMS))
    return "\n".join(lines)


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.2), squeeze=False)
    for ax, (view, s) in zip(axes[0], summaries.items()):
        ts = [int(t) for t in s["per_t"]]
        for form, style in zip(FORMS, ("C0-", "C1-", "C3-", "C2-", "C4-", "C0:")):
            med = [s["per_t"][str(t)][form]["median_abs_logit"] for t in ts]
            mx = [s["per_t"][str(t)][form]["max_abs_logit"] for t in ts]
            ax.plot(ts, med, style, marker="o", ms=3, label=f"{form} median")
            ax.plot(ts, mx, style, alpha=0.35, label=f"{form} max")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("|logit| = |beta/2 d|")
        ax.set_title(f"{view}: preference logit scale per timestep")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", default="bundle,sd15")
    p.add_argument("--lora", default=None, help="bundle view: a trained LoRA folder (a run's step-N or lora/)")
    p.add_argument("--random-lora-scale", type=float, default=0.01,
                   help="bundle view without --lora: a random LoRA, B scaled by this")
    p.add_argument("--taps", default="mid", help="encoder taps of the NCP forms: a preset (mid, authors, ...)")
    p.add_argument("--pairs", type=int, default=64, help="bundle view: pairs")
    p.add_argument("--filtered", action="store_true", help="bundle view: absolute-winner pairs only")
    p.add_argument("--sd15-pairs", type=int, default=8)
    p.add_argument("--sd15-latent", type=int, default=16, help="sd15 view: latent side (x8 pixels)")
    p.add_argument("--sd15-lora-scale", type=float, default=0.01, help="sd15 view: multiply the random LoRA B by this")
    p.add_argument("--t", default=",".join(map(str, T_GRID)))
    p.add_argument("--beta-latent", type=float, default=5000.0)
    p.add_argument("--beta-ncp", type=float, default=2e6, help="NCP-DPO's beta on the bundled world")
    p.add_argument("--beta-log", type=float, default=5000.0, help="beta of the log forms")
    p.add_argument("--beta-coef", type=float, default=1000.0, help="beta of the coef form")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="runs/error_scale")
    p.add_argument("--out", default=str(HERE / "results" / "error_scale.json"))
    args = p.parse_args(argv)
    args.t = [int(x) for x in args.t.split(",")]
    torch.set_num_threads(args.threads)
    betas = {"latent": args.beta_latent, "ncp": args.beta_ncp, "ncp_coef": args.beta_coef, "ncp_log": args.beta_log,
             "ncp_log_t": args.beta_log, "latent_log": args.beta_log}
    summaries, raw = {}, {}
    for view in [v for v in args.views.split(",") if v]:
        print(f"view {view}", flush=True)
        res = {"bundle": bundle_view, "sd15": sd15_view}[view](args)
        summaries[view] = summarise(res, betas)
        raw[view] = {str(t): {f: d[f].tolist() for f in FORMS} for t, d in res.items()}
        print(format_table(view, summaries[view]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"summaries": summaries, "differences": raw, "args": {k: v for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    plot(summaries, png)
    print(f"wrote {out} and {png}")
    return result


if __name__ == "__main__":
    main()
