"""The preference protocol with named variants: each variant any objective and overrides, all against one baseline.

``quality.py`` compares every objective with its latent counterpart under one global set of betas; the
questions of issue 26 need variants that differ in several options at once (the authors' taps at their
beta, ``error_scale=coef`` at a beta chosen from the logit table, ...). Here each variant is a label and
its ``section.key=value`` overrides; every run trains the bundled world (or ``--world``) on the filtered
("absolute winners") pairs with the default run's other settings, for ``--steps`` optimizer steps,
and every ``--eval-every`` steps the checkpoint draws the held-out prompts x ``--eval-seeds`` (the same
seeds for every run) and the world's judge scores them.

Reported for each variant against ``--baseline`` (paired images: same prompt, sampling seed and training
seed; bootstrap 95 % intervals over images, pooled over the training seeds both have):
- win rate and mean reward difference at equal steps and at equal wall time;
- the steps the variant needs to reach the baseline's final reward;
- the implicit training accuracy per 100 steps, its last-fifth mean, and steps with loss > 2;
- the drift from the base: the judge's reward gain over the base model, and the policy's relative error
  against the reference in the objective's own space, ``mean (ERR_theta - ERR_ref) / ERR_ref`` over the
  last 100 steps, winners and losers apart (a policy that moves away from the base on both grows both).

    python benchmarks/protocol.py --runs runs/p26 --seeds 0,1,2 \\
        --variant dpo=objective.name=dpo \\
        --variant authors-5000=objective.name=ncp-dpo,objective.taps=[authors],objective.beta=5000

A finished run's result is kept in ``<runs>/<variant>-s<seed>/result.json`` with the settings it was made
with, and reused by any later invocation that would make the same run, so several processes (one per core)
can share ``--runs`` with different variants or seeds, and a final ``--analyse-only`` with the union of
their variants collects them all. Writes ``--out`` (JSON) and a reward-vs-steps PNG beside it, and prints
the tables.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from quality import (_read_for_settings, _write_json_atomic, at_time, cumulative_time, curve,  # noqa: E402
                     read_metrics, training_fit, win_rate, write_result)

DRIFT_WINDOW = 100  # steps at the end of a run over which the policy's error drift is averaged


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'label=section.key=value,section.key=value' -> (label, overrides). Commas inside [...] stay."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"--variant {text!r}: expected LABEL=section.key=value[,section.key=value...]")
    overrides, depth, cur = [], 0, ""
    for ch in rest:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            overrides.append(cur)
            cur = ""
        else:
            cur += ch
    overrides.append(cur)
    bad = [o for o in overrides if "=" not in o or "." not in o.partition("=")[0]]
    if bad:
        raise SystemExit(f"--variant {label}: {bad[0]!r} is not section.key=value")
    return label, overrides


def run_overrides(variant: list[str], seed: int, args, run_dir: Path) -> list[str]:
    n_ckpt = args.steps // args.eval_every + 2
    return ["data.absolute_winners=true", f"train.seed={seed}", f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.eval_every}", f"train.keep_checkpoints={n_ckpt}",
            f"train.output_dir={run_dir}", "train.report=false", "logging.progress=false",
            "logging.tensorboard=false", f"train.cpu_threads={args.threads}", *args.override, *variant]


def train_run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.train import train

    cfg = load_config(DEFAULT_CONFIG, overrides)
    if run_dir.exists():  # a stale run (other settings, or cut off): its checkpoints must not mix in
        shutil.rmtree(run_dir)
    t0 = time.time()
    train(cfg)
    recs = read_metrics(run_dir)
    ckpts = {int(p.name.split("-")[1]): str(p) for p in sorted(run_dir.glob("step-*")) if p.is_dir()}
    return {"checkpoints": ckpts, "wall_s": time.time() - t0,
            "step_s": [r.get("perf/step_s", float("nan")) for r in recs],
            "loss": [r.get("loss", float("nan")) for r in recs],
            "accuracy": [r.get("rewards/accuracy", float("nan")) for r in recs],
            "drift": drift(recs[-DRIFT_WINDOW:])}


def drift(recs: list[dict]) -> dict[str, float] | None:
    """``mean (ERR_theta - ERR_ref) / ERR_ref`` of winners and losers over ``recs`` (None without a reference)."""
    out = {}
    for side in ("winner", "loser"):
        pairs = [(r[f"err/policy_{side}"], r[f"err/reference_{side}"]) for r in recs
                 if f"err/reference_{side}" in r and r[f"err/reference_{side}"] > 0]
        if pairs:
            out[side] = float(np.mean([(p - q) / q for p, q in pairs]))
    return out or None


def analyse(runs: dict[str, dict[int, dict]], base: list[float], baseline: str) -> dict[str, Any]:
    from ncp.evaluate import bootstrap_ci

    last = lambda r: max(int(k) for k in r["scores"])  # noqa: E731
    out: dict[str, Any] = {"base_reward": float(np.mean(base)), "base_reward_ci95": bootstrap_ci(base),
                           "baseline": baseline, "variants": {}}
    for label, by_seed in runs.items():
        g = [by_seed[s] for s in sorted(by_seed)]
        steps, means = curve(g)
        final = [x for r in g for x in r["scores"][str(last(r))]]
        entry: dict[str, Any] = {
            "seeds": sorted(by_seed), "steps": steps, "reward": means,
            "train_s": [float(np.mean([cumulative_time(r["step_s"], s) for r in g])) for s in steps],
            "final_reward": float(np.mean(final)), "final_ci95": bootstrap_ci(final),
            "gain_over_base": float(np.mean(final) - np.mean(base)),
            "final_per_seed": {str(s): float(np.mean(by_seed[s]["scores"][str(last(by_seed[s]))])) for s in by_seed},
            "step_s": float(np.nanmean([np.nanmean(r["step_s"]) for r in g])),
            "training": training_fit(g),
            "drift": {side: float(np.mean([r["drift"][side] for r in g if r.get("drift") and side in r["drift"]]))
                      for side in ("winner", "loser") if any(r.get("drift") and side in r["drift"] for r in g)},
        }
        common = sorted(set(by_seed) & set(runs.get(baseline, {})))
        if label != baseline and common:
            gn, gl = [by_seed[s] for s in common], [runs[baseline][s] for s in common]

            def eq_time(rn, rl):
                budget = min(cumulative_time(rn["step_s"], last(rn)), cumulative_time(rl["step_s"], last(rl)))
                return at_time(rn, budget), at_time(rl, budget)

            _, base_means = curve(gl)
            reach = next((s for s, m in zip(*curve(gn)) if m >= base_means[-1]), None)
            entry["vs_baseline"] = {"seeds": common,
                                    "equal_steps": win_rate(gn, gl, lambda rn, rl: (last(rn), last(rl))),
                                    "equal_time": win_rate(gn, gl, eq_time), "steps_to_baseline_final": reach}
        out["variants"][label] = entry
    return out


def format_tables(res: dict) -> str:
    pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
    lines = [f"base model reward (judge): {res['base_reward']:.4f} "
             f"[{res['base_reward_ci95'][0]:.4f}, {res['base_reward_ci95'][1]:.4f}]", "",
             f"{'variant':<22} {'seeds':>5} {'final reward':>13} {'gain':>8} {'step s':>7} {'acc last 1/5':>12} "
             f"{'spikes':>6} {'drift w/l':>15}"]
    for label, v in res["variants"].items():
        fit = v["training"] or {}
        d = v["drift"]
        drift_s = f"{d['winner']:+.3f}/{d['loser']:+.3f}" if {"winner", "loser"} <= set(d) else "-"
        lines.append(f"{label:<22} {len(v['seeds']):>5} {v['final_reward']:13.4f} {v['gain_over_base']:+8.4f} "
                     f"{v['step_s']:7.2f} {fit.get('accuracy_last_fifth', float('nan')):12.3f} "
                     f"{fit.get('loss_spikes_per_run', float('nan')):6.1f} {drift_s:>15}")
    lines += ["", f"against the baseline ({res['baseline']}): win rate and mean reward difference, 95 % CI",
              f"{'variant':<22} {'equal steps':>36} {'equal wall time':>36} {'steps to its final':>18}"]
    for label, v in res["variants"].items():
        vs = v.get("vs_baseline")
        if not vs:
            continue
        cells = []
        for k in ("equal_steps", "equal_time"):
            w = vs[k]
            cells.append(f"{pct(w['win_rate'])}% [{pct(w['ci95'][0])},{pct(w['ci95'][1])}] "
                         f"{w['mean_diff']:+.4f}")
        lines.append(f"{label:<22} {cells[0]:>36} {cells[1]:>36} {str(vs['steps_to_baseline_final'] or '-'):>18}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, v in res["variants"].items():
        ax.plot([0] + v["steps"], [res["base_reward"]] + v["reward"], marker="o", ms=3, label=label)
        if v["training"]:
            ax2.plot(v["training"]["steps"], v["training"]["accuracy"], label=label)
    ax.axhline(res["base_reward"], color="gray", lw=0.8, ls=":")
    ax.set(title="judge reward vs steps (held-out prompts)", xlabel="optimizer step", ylabel="mean judge reward")
    ax2.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax2.set(title="implicit training accuracy (100-step windows)", xlabel="optimizer step", ylabel="accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], required=True,
                   help="LABEL=section.key=value[,...]; repeat for each variant")
    p.add_argument("--baseline", default="dpo", help="the variant label every other variant is compared with")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-prompts", type=int, default=0, help="first N held-out prompts (0: all)")
    p.add_argument("--eval-seeds", type=int, default=8, help="images per held-out prompt")
    p.add_argument("--sample-steps", type=int, default=0, help="sampling steps (0: the world's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, training (train.cpu_threads: the default config's 2 would oversubscribe "
                        "two runs side by side on 2 cores, ~10x slower) and sampling")
    p.add_argument("--override", action="append", default=[], help="section.key=value for every run")
    p.add_argument("--world", default=None, help="a world folder (model/, data/) instead of the bundle")
    p.add_argument("--runs", default="runs/protocol")
    p.add_argument("--out", default=str(HERE / "results" / "protocol.json"))
    p.add_argument("--analyse-only", action="store_true", help="no training: tables from the finished runs")
    args = p.parse_args(argv)
    variants = dict(parse_variant(v) for v in args.variant)
    seeds = [int(s) for s in args.seeds.split(",") if s]

    import logging

    import torch
    from diffusers.utils import logging as diffusers_logging

    from ncp.paths import bundle_path
    from ncp.sampling import read_prompts, sampling_defaults
    from quality import Evaluator

    logging.basicConfig(level=logging.WARNING)
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    world = Path(args.world) if args.world else bundle_path()
    model_dir = world / "model"
    prompts = read_prompts(world / "data" / "heldout_prompts.txt")
    if args.world:
        args.override = [f"model.path={model_dir}", f"data.sources=[{world / 'data' / '*.parquet'}]", *args.override]
    prompts = prompts[: args.eval_prompts] if args.eval_prompts else prompts
    sample_steps, guidance = sampling_defaults(model_dir)
    sample_steps = args.sample_steps or sample_steps
    common = {"steps": args.steps, "eval_every": args.eval_every, "eval_seeds": args.eval_seeds,
              "sample_steps": sample_steps, "guidance": guidance, "override": args.override,
              "world": args.world, "prompts": prompts}
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(model_dir, prompts, args.eval_seeds, sample_steps, guidance)
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:  # seed-major: a process stopped early still holds complete seeds
        for label, overrides in variants.items():
            run_dir = runs_dir / f"{label}-s{seed}"
            key = json.loads(json.dumps(common | {"variant": overrides, "seed": seed}))
            cached = _read_for_settings(run_dir / "result.json", key)
            if cached is not None:
                runs.setdefault(label, {})[seed] = cached["run"]
                continue
            if args.analyse_only:
                continue
            t0 = time.time()
            run = train_run(run_overrides(overrides, seed, args, run_dir), run_dir)
            run["scores"] = {str(s): evaluator.lora(d) for s, d in sorted(run.pop("checkpoints").items())}
            _write_json_atomic(run_dir / "result.json", {"settings": key, "run": run})
            runs.setdefault(label, {})[seed] = run
            final = run["scores"][str(max(int(k) for k in run["scores"]))]
            print(f"{label} seed {seed}: final reward {np.mean(final):.4f} (base {np.mean(evaluator.base):.4f}), "
                  f"{time.time() - t0:.0f} s", flush=True)
    res = analyse(runs, evaluator.base, args.baseline)
    res["settings"] = common | {"variants": variants, "seeds": seeds, "threads": args.threads}
    res["command"] = "python benchmarks/protocol.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return write_result(res, Path(args.out), t_start, args.threads, plot, format_tables)


if __name__ == "__main__":
    main()
