"""Does beta matter where the sigmoid is linear? Adam against the scale of the logit (issue 26).

In the sigmoid's linear range an objective's loss is ``beta x (a function of the errors)``, so beta scales
the gradient and nothing else; Adam's update ``m / (sqrt(v) + eps)`` divides that scale out, except through
``eps``, and gradient clipping would break it too. This trains three short runs from one seed (the same
pairs, noise and timesteps) and compares what their LoRAs do to the model (the per-module deltas
``up @ down``):

    (a) beta = ``--low``, eps = ``--eps``
    (b) beta = ``--high``, eps = ``--eps``
    (c) beta = ``--low``, eps = ``--eps`` x low / high (the scale Adam's eps would have at (b)'s gradients)

If the loss is linear in beta's range and nothing is clipped, (c) equals (b) up to rounding; (a) against (b)
shows what eps alone changes. The default is NCP-DPO with the authors' taps, whose logits at beta 5000 sit in
the linear range (the archive's logit table); ``--objective dpo`` is the control (its logits are O(1)).

    python benchmarks/adam_beta.py --out benchmarks/results/adam_beta.json
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(HERE))

from onpolicy import sh  # noqa: E402
from quality import _write_json_atomic, read_metrics  # noqa: E402
from step import machine  # noqa: E402

CLIP = 1.0  # optim.max_grad_norm of every arm: a clipped step breaks Adam's scale invariance


def lora_deltas(lora_dir: Path) -> dict:
    """What a LoRA folder (``ncp.train``'s ``<run>/lora``) adds to each module: ``alpha / rank x up @ down``
    (float64, kernels flattened), by module name."""
    from ncp.export import read_lora

    modules, alpha, rank = read_lora(lora_dir)
    return {name: alpha / rank * up.double().flatten(1) @ down.double().flatten(1)
            for name, (down, up) in modules.items()}


def compare(a: dict, b: dict) -> dict:
    """How far LoRA deltas ``a`` are from ``b`` over all modules: ``|a - b| / |b|``, the cosine, both norms."""
    import torch

    if a.keys() != b.keys():
        raise ValueError(f"the two LoRAs adapt different modules: {sorted(a.keys() ^ b.keys())[:3]}")
    va = torch.cat([a[k].flatten() for k in sorted(a)])
    vb = torch.cat([b[k].flatten() for k in sorted(a)])
    return {"rel_diff": float((va - vb).norm() / vb.norm()), "cosine": float(va @ vb / (va.norm() * vb.norm())),
            "norm_a": float(va.norm()), "norm_b": float(vb.norm())}


def grad_stats(run: Path) -> dict:
    g = sorted(r["train/grad_norm"] for r in read_metrics(run) if "train/grad_norm" in r)
    return {"grad_norm_median": g[len(g) // 2], "clipped_fraction": sum(x > CLIP for x in g) / len(g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objective", default="ncp-dpo")
    ap.add_argument("--overrides", default="objective.taps=[authors]", help="comma list of section.key=value")
    ap.add_argument("--low", type=float, default=50.0)
    ap.add_argument("--high", type=float, default=5000.0)
    ap.add_argument("--eps", type=float, default=1e-8, help="Adam's eps at (a) and (b) (the config's default)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="runs/adam_beta")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    t0 = time.time()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    common = [f"objective.name={a.objective}", *[o for o in a.overrides.split(",") if o], f"train.max_steps={a.steps}",
              "train.report=false", "train.checkpoint_every=0", "logging.progress=false", "logging.tensorboard=false",
              f"train.cpu_threads={a.threads}", "train.seed=0", f"optim.max_grad_norm={CLIP}"]
    arms = {"a": (a.low, a.eps), "b": (a.high, a.eps), "c": (a.low, a.eps * a.low / a.high)}
    for name, (beta, eps) in arms.items():
        out = runs / name
        cmd = [sys.executable, "-m", "ncp.train", *common, f"objective.beta={beta}", f"optim.eps={eps}",
               f"train.output_dir={out}", "--overwrite"]
        print(f"({name}) beta {beta:g}, eps {eps:.3g}", flush=True)
        sh(cmd, runs / f"{name}.log")
    deltas = {n: lora_deltas(runs / n / "lora") for n in arms}
    res = {"benchmark": "adam_beta", "command": " ".join(sys.argv), "settings": vars(a),
           "arms": {n: {"beta": b, "eps": e, **grad_stats(runs / n)} for n, (b, e) in arms.items()},
           "a_vs_b": compare(deltas["a"], deltas["b"]), "c_vs_b": compare(deltas["c"], deltas["b"]),
           "machine": machine("cpu"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "total_s": round(time.time() - t0, 1)}
    _write_json_atomic(Path(a.out), res, indent=2)
    print(f"\n{a.objective} {a.overrides}, {a.steps} steps: LoRA deltas against (b) beta {a.high:g}")
    print("| arm | beta | eps | median grad norm | clipped | rel. diff to (b) | cosine to (b) | |delta| |")
    print("|---|---|---|---|---|---|---|---|")
    for n, (b, e) in arms.items():
        s = res["arms"][n]
        c = res[f"{n}_vs_b"] if n != "b" else {"rel_diff": 0.0, "cosine": 1.0, "norm_a": res["a_vs_b"]["norm_b"]}
        print(f"| ({n}) | {b:g} | {e:.3g} | {s['grad_norm_median']:.3g} | {100 * s['clipped_fraction']:.0f} % | "
              f"{c['rel_diff']:.4f} | {c['cosine']:.5f} | {c['norm_a']:.4f} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
