"""Where in t does each DPO form spend its update? (issue 15: why the log form gains less)

For the bundled model with a LoRA (``--lora``; none: the untrained init, where
policy = reference), a fixed batch of pairs and one fixed noise draw, this takes
at each timestep t of a grid the DPO loss of the whole batch at that single t,
in three forms:

    latent     Diffusion-DPO on latent errors               (beta --beta-latent)
    ncp        NCP-DPO, the paper's form (error_scale=paper) (beta --beta-ncp)
    ncp_log    NCP-DPO on log errors (error_scale=log)       (beta --beta-log)
    ncp_log_t  NCP-DPO on log errors times w(t) (error_scale=log_t, the table calibrated on this batch)
                                                             (beta --beta-log)

and records the gradient g_t of that loss with respect to the LoRA weights.
Training samples t uniformly, so a form's expected update is the mean of its g_t
over t; the table gives, per t and form:

- ``share``: |g_t| / sum over the grid of |g_t|: how much of the update comes from t;
- ``cos_own``: the cosine of g_t with the form's own mean gradient: does t push
  the same way as the whole;
- ``cos_latent``: the cosine of g_t with latent DPO's mean gradient (the
  objective that reaches the best reward on this world at 1500 steps).

    python benchmarks/gradient_by_t.py --lora runs/q15/ncp-dpo-filtered-auto-s0/step-000300 --filtered

Writes benchmarks/results/gradient_by_t.json (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))

from error_scale import T_GRID  # noqa: E402  (the same grid as the logit-scale probe)

FORMS = {"latent": ("dpo", "paper"), "ncp": ("ncp-dpo", "paper"), "ncp_log": ("ncp-dpo", "log"),
         "ncp_log_t": ("ncp-dpo", "log_t")}


def setup_bundle(args):
    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.trainer import batch_inputs, setup

    overrides = [f"data.batch_size={args.pairs}", "train.report=false", "data.backend=torch", "data.num_workers=0",
                 f"train.output_dir={args.tmp}", "logging.progress=false", "logging.tensorboard=false",
                 f"data.absolute_winners={'true' if args.filtered else 'false'}", f"train.seed={args.seed}"]
    if args.lora:
        overrides.append(f"lora.init_from={args.lora}")
    tr = setup(load_config(DEFAULT_CONFIG, overrides))
    return (tr, *batch_inputs(tr, next(iter(tr.source)), torch.Generator().manual_seed(args.seed)))


def gradients(tr, x0, cond, t_grid, betas: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """(len(t_grid), n_lora_params) float64 gradients per form."""
    from ncp.step import StepNoise, preference_step
    from ncp.timestep_scale import calibrated
    from ncp.trainer import criterion_for

    criteria = {form: criterion_for(tr, name, beta=betas[form], error_scale=scale)
                for form, (name, scale) in FORMS.items()}
    criteria["ncp_log_t"] = calibrated(criteria["ncp_log_t"], tr.unet, tr.base, x0, cond,
                                       torch.Generator().manual_seed(seed))
    params = [p for n, p in tr.unet.named_parameters() if p.requires_grad]
    b = x0.shape[0] // 2
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((b, *x0.shape[1:]), generator=gen)
    z = torch.randn((b, *x0.shape[1:]), generator=gen)
    out = {form: [] for form in FORMS}
    for t in t_grid:
        t0 = time.time()
        noise = StepNoise(torch.full((b,), t, dtype=torch.long), eps, z)
        for form, criterion in criteria.items():
            for p in params:
                p.grad = None
            step = preference_step(criterion, tr.unet, tr.base, x0, cond, noise)
            step.loss.backward()
            out[form].append(torch.cat([p.grad.flatten().double() for p in params]).numpy())
        print(f"  t={t:4d}  ({time.time() - t0:.1f}s)", flush=True)
    return {form: np.stack(g) for form, g in out.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else float("nan")


def summarise(grads: dict[str, np.ndarray], t_grid) -> dict:
    mean_latent = grads["latent"].mean(0)
    rows: dict[str, dict] = {str(t): {} for t in t_grid}
    for form, g in grads.items():
        norms = np.linalg.norm(g, axis=1)
        mean = g.mean(0)
        for i, t in enumerate(t_grid):
            rows[str(t)][form] = {"norm": float(norms[i]), "share": float(norms[i] / norms.sum()),
                                  "cos_own": cosine(g[i], mean), "cos_latent": cosine(g[i], mean_latent)}
    overall = {form: {"cos_mean_with_latent_mean": cosine(g.mean(0), mean_latent),
                      "share_t_ge_400": float(sum(rows[str(t)][form]["share"] for t in t_grid if t >= 400))}
               for form, g in grads.items()}
    return {"per_t": rows, "overall": overall}


def format_table(s: dict) -> str:
    forms = list(FORMS)
    head = f"{'t':>5} | " + " | ".join(f"{f + ' share':>13} {'cos own':>8} {'cos lat':>8}" for f in forms)
    lines = [head, "-" * len(head)]
    for t, r in s["per_t"].items():
        lines.append(f"{t:>5} | " + " | ".join(
            f"{r[f]['share']:>13.3f} {r[f]['cos_own']:>8.2f} {r[f]['cos_latent']:>8.2f}" for f in forms))
    for f, o in s["overall"].items():
        lines.append(f"{f}: share of t >= 400 {o['share_t_ge_400']:.3f}; mean gradient's cosine with latent DPO's "
                     f"{o['cos_mean_with_latent_mean']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", default=None, help="a trained LoRA folder (a run's step-N or lora/); none: the init")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--filtered", action="store_true", help="absolute-winner pairs only")
    p.add_argument("--t", default=",".join(map(str, T_GRID)))
    p.add_argument("--beta-latent", type=float, default=5000.0)
    p.add_argument("--beta-ncp", type=float, default=2e6)
    p.add_argument("--beta-log", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="runs/gradient_by_t")
    p.add_argument("--out", default=str(HERE / "results" / "gradient_by_t.json"))
    args = p.parse_args(argv)
    t_grid = [int(x) for x in args.t.split(",")]
    torch.set_num_threads(args.threads)
    betas = {"latent": args.beta_latent, "ncp": args.beta_ncp, "ncp_log": args.beta_log, "ncp_log_t": args.beta_log}
    tr, x0, cond = setup_bundle(args)
    summary = summarise(gradients(tr, x0, cond, t_grid, betas, args.seed), t_grid)
    print(format_table(summary), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    key = args.lora or "init"
    previous[key] = {"summary": summary, "betas": betas, "args": vars(args),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out.write_text(json.dumps(previous, indent=1) + "\n")
    print(f"wrote {out} [{key}]")
    return summary


if __name__ == "__main__":
    main()
