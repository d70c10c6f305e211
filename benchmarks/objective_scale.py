"""Which MaPO and KTO scales give NCP logits of the latent objectives' size? (issue 16)

NCP-DPO's beta on the bundled world is 5000 x ~400 because its logit differences
are ~400x smaller than DPO's (RESULTS_ARCHIVE.md, "Why NCP needs a different beta here").
MaPO and KTO build their logits from other differences, so each gets its own ratio:

- MaPO: ``T (g(ERR_w) - g(ERR_l))`` with ``g(x) = s x / (exp(s x) - 1)``; for small ``s x``
  that is ``T s / 2 (ERR_l - ERR_w)``: the policy's winner-loser difference, no reference.
  ``mapo_snr`` (s) plays beta's part.
- KTO: ``beta_kto (r - z)`` per image, ``r = ERR_ref - ERR_theta``, ``z = max(0, mean r)``:
  the policy-reference difference of single images.

For a fixed batch of bundled pairs, each t of a grid (one t for the batch, the same
noise for every t), a trained LoRA, this prints the median |difference| of each
form in latent and perceptual (mid-block) space, their ratio per t, and the NCP
values that match the authors' latent defaults (default x median ratio over t).

    python benchmarks/objective_scale.py --lora outputs/default/lora

Writes benchmarks/results/objective_scale.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

T_GRID = (1, 5, 20, 50, 100, 200, 400, 600, 800, 999)
DEFAULTS = {"mapo_snr": 0.5, "beta_kto": 1000.0}  # the authors' values (docs/objectives.md)


def differences(tr, x0, cond, t: int, eps, z) -> dict[str, dict[str, np.ndarray]]:
    """{space: {"mapo": |ERR_w - ERR_l| per pair, "kto": |r - z| per image, "dpo": |d_theta - d_ref| per pair}}."""
    from ncp.step import StepNoise, branch_errors
    from ncp.trainer import criterion_for

    b = eps.shape[0]
    noise = StepNoise(torch.full((b,), t, dtype=torch.long), eps, z)
    out = {}
    with torch.no_grad():
        for space, name in (("latent", "dpo"), ("ncp", "ncp-dpo")):
            err, ref = (e.double() for e in branch_errors(criterion_for(tr, name), tr.unet, tr.base, x0, cond, noise))
            reward = ref - err
            out[space] = {"mapo": (err[:b] - err[b:]).abs().numpy(),
                          "kto": (reward - reward.mean().clamp(min=0)).abs().numpy(),
                          "dpo": ((err[:b] - ref[:b]) - (err[b:] - ref[b:])).abs().numpy()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", required=True, help="a trained LoRA folder (KTO's rewards are 0 without one)")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--t", default=",".join(map(str, T_GRID)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default="runs/objective_scale")
    p.add_argument("--out", default=str(HERE / "results" / "objective_scale.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.trainer import batch_inputs, setup

    overrides = [f"data.batch_size={args.pairs}", "train.report=false", "data.backend=torch", "data.num_workers=0",
                 f"train.output_dir={args.tmp}", "logging.progress=false", "logging.tensorboard=false",
                 f"lora.init_from={args.lora}"]
    tr = setup(load_config(DEFAULT_CONFIG, overrides))
    tr.unet.eval()
    batch = next(iter(tr.source))
    gen = torch.Generator().manual_seed(args.seed)
    x0, cond = batch_inputs(tr, batch, gen)
    eps = torch.randn((len(batch), *x0.shape[1:]), generator=gen)
    z = torch.randn((len(batch), *x0.shape[1:]), generator=gen)
    rows = []
    for t in [int(x) for x in args.t.split(",")]:
        d = differences(tr, x0, cond, t, eps, z)
        row = {"t": t}
        for form in ("mapo", "kto", "dpo"):
            lat, ncp = float(np.median(d["latent"][form])), float(np.median(d["ncp"][form]))
            row[form] = {"latent": lat, "ncp": ncp, "ratio": lat / ncp if ncp > 0 else float("nan")}
        rows.append(row)
    ratios = {form: float(np.nanmedian([r[form]["ratio"] for r in rows])) for form in ("mapo", "kto", "dpo")}
    suggested = {"mapo_snr": DEFAULTS["mapo_snr"] * ratios["mapo"], "beta_kto": DEFAULTS["beta_kto"] * ratios["kto"]}
    print(f"{'t':>5} " + " ".join(f"{f + ' lat':>11} {f + ' ncp':>11} {'ratio':>7}" for f in ("mapo", "kto", "dpo")))
    for r in rows:
        print(f"{r['t']:5d} " + " ".join(f"{r[f]['latent']:11.3e} {r[f]['ncp']:11.3e} {r[f]['ratio']:7.0f}"
                                         for f in ("mapo", "kto", "dpo")))
    print("median ratio over t: " + ", ".join(f"{k} {v:.0f}" for k, v in ratios.items()))
    print("NCP values matching the latent defaults: " + ", ".join(f"{k} = {v:.3g}" for k, v in suggested.items()))
    res = {"rows": rows, "median_ratio": ratios, "suggested": suggested, "defaults": DEFAULTS,
           "settings": vars(args), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "torch": torch.__version__}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
