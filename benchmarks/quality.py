"""Quality benchmark: NCP objectives against their latent-space counterparts on the bundled world.

The analogue of the paper's Table 1 (docs/method.md): train every objective of
``ncp.objectives.OBJECTIVES`` (``sft, dpo, cpo, mapo, kto`` and their ``ncp-`` forms,
docs/objectives.md) with LoRA on the bundled preference data, on the
full pairs and on the "absolute winners" subset, over several seeds, with the
default run's hyperparameters (python/ncp/configs/default.yaml) and equal
optimizer steps; every ``--eval-every`` steps the checkpoint draws the held-out
prompts (same seeds for every run) and the world's judge scores them.

Reported:
- the win rate of each NCP objective over its latent counterpart (paired
  images: same prompt, same sampling seed, same training seed; ties count 1/2)
  with a bootstrap 95% interval over images, at equal steps and at equal wall
  time (each run taken at its last checkpoint within the slower one's ... faster
  one's total training time);
- the judge's mean reward of each run against the steps (JSON and PNG), the
  base model's reward, and the steps each NCP objective needs to reach the
  final reward of its latent counterpart;
- NCP-DPO's tap presets (``paper``, ``mid``, ``multiscale``) on the filtered data.

    python benchmarks/quality.py                      # the full protocol (slow on a CPU)
    python benchmarks/quality.py --steps 60 --eval-every 20 --seeds 3 --eval-prompts 32
    python benchmarks/quality.py --quick              # smoke test: 2 steps, 1 seed, 2 prompts

Runs go to ``--runs`` (default runs/quality); each finished run's result is kept in
``<run>/result.json`` there and skipped on a re-run whose settings would give the same
result (the plan -- objectives, data, taps, seeds -- may differ, so several processes
with different plans can share one ``--runs`` and a final ``--analyse-only`` with the
union of their plans collects them all). Writes
benchmarks/results/quality.json and quality_reward_vs_steps.png and prints the
tables. Wall times come from ``perf/step_s`` in each run's metrics.jsonl: on a
shared machine they are noisy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

from ncp.objectives import OBJECTIVES as _OBJECTIVE_TABLE  # noqa: E402  (after the path above)

OBJECTIVES = sorted(_OBJECTIVE_TABLE, key=lambda name: name.startswith("ncp-"))  # the latent ones first
# Options of one objective only: they join the result key of that objective's runs alone (run_key), so
# adding or changing one leaves the other objectives' finished runs valid.
OWN_ARGS = {"mapo": ("beta_mapo", "mapo_snr", "mapo_lambda", "ncp_mapo_snr"), "kto": ("beta_kto", "ncp_beta_kto")}
SCALE_SEP = "@"  # "ncp-dpo@log", "ncp-dpo@log_t": the objective with that objective.error_scale (docs/error_scale.md)


def split_objective(name: str) -> tuple[str, str]:
    """'ncp-dpo@log' -> ('ncp-dpo', 'log'); 'dpo' -> ('dpo', 'paper')."""
    objective, _, scale = name.partition(SCALE_SEP)
    return objective, scale or "paper"


def latent_counterpart(name: str) -> str:
    """The latent objective an NCP variant is compared with: 'ncp-dpo@log' -> 'dpo'."""
    return split_objective(name)[0].removeprefix("ncp-")


def comparisons(objectives: list[str]) -> list[tuple[str, str]]:
    """(ncp variant, latent counterpart) for every NCP objective of the plan whose counterpart is in it too."""
    return [(o, latent_counterpart(o)) for o in objectives
            if o.startswith("ncp-") and latent_counterpart(o) in objectives]
TAPS = ["paper", "mid", "multiscale"]
BETA_LOG = 100.0  # beta of the log-error variants: median |logit| ~1 across t (benchmarks/error_scale.py, RESULTS.md)
PLAN_KEYS = ("objectives", "data", "taps", "seeds", "threads")  # settings that do not change a run's result


def _write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def write_result(res: dict, out: Path, t_start: float, threads: int, plot_fn, format_fn) -> dict:
    """Stamp a benchmark's result with the machine, date and total time, write it atomically, plot it to
    ``<out stem>_reward_vs_steps.png`` beside it and print its tables (quality.py and protocol.py)."""
    import torch

    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
                      "python": platform.python_version(), "torch": torch.__version__}
    res["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res["total_s"] = round(time.time() - t_start, 1)
    _write_json_atomic(out, res, indent=2)
    png = out.with_name(out.stem + "_reward_vs_steps.png")
    plot_fn(res, png)
    print(format_fn(res))
    print(f"wrote {out} and {png}")
    return res


def read_metrics(run_dir: Path) -> list[dict]:
    """A run folder's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _read_for_settings(path: Path, key: dict) -> dict | None:
    """What ``path`` holds if it was written for the settings ``key``; None otherwise."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    return cached if cached.get("settings") == key else None


@dataclass(frozen=True)
class RunSpec:
    objective: str
    data: str  # full | filtered
    seed: int
    taps: str = "auto"  # auto = mid for SD1.5-style models

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.data}-{self.taps}-s{self.seed}"


# ---------------------------------------------------------------- training


def calibrate_ncp_scale(args, runs_dir: Path) -> float:
    """mean latent ERR / mean perceptual PL of the base model on the first batches (4 steps each, lr ~ 0)."""
    means = {}
    for obj in ("dpo", "ncp-dpo"):
        probe = argparse.Namespace(**{**vars(args), "steps": 4, "eval_every": 4, "ncp_scale": 1.0,
                                      "ncp_lambda_scale": 1.0,
                                      "override": [*args.override, "optim.lr=1e-12"]})
        run = train_run(RunSpec(obj, "full", 0), probe, runs_dir / f"calibrate-{obj}")
        recs = read_metrics(runs_dir / f"calibrate-{obj}")
        means[obj] = float(np.mean([r["err/policy_winner"] + r["err/policy_loser"] for r in recs]))
        del run
    return means["dpo"] / means["ncp-dpo"]


def train_run(spec: RunSpec, args, run_dir: Path) -> dict[str, Any]:
    """Train one run in-process; return its checkpoint folders and per-step wall times."""
    from ncp.config import DEFAULT_CONFIG, load_config
    from ncp.train import train

    n_ckpt = args.steps // args.eval_every + 2
    objective, error_scale = split_objective(spec.objective)
    scaled = [f"objective.error_scale={error_scale}"]
    if error_scale in ("log", "log_t"):  # log errors have no magnitude to rescale: one beta for both spaces
        scaled += [f"objective.beta={args.beta_log}", f"objective.beta_cpo={args.beta_log}"]
    elif objective.startswith("ncp-"):
        s = args.ncp_scale  # NCP errors are ~s times smaller than latent ones: same logit scale for both
        scaled += [f"objective.beta={args.beta * s}", f"objective.beta_cpo={args.beta_cpo * s}",
                  f"objective.cpo_lambda={args.cpo_lambda * args.ncp_lambda_scale}",
                  # MaPO's logit is ~ T s/2 (ERR_l - ERR_w) for small s ERR: s plays beta's part
                  f"objective.mapo_snr={args.mapo_snr * s if args.ncp_mapo_snr is None else args.ncp_mapo_snr}",
                  f"objective.mapo_lambda={args.mapo_lambda * args.ncp_lambda_scale}",
                  f"objective.beta_kto={args.beta_kto * s if args.ncp_beta_kto is None else args.ncp_beta_kto}"]
    overrides = [
        f"objective.name={objective}", f"objective.taps=[{spec.taps}]",
        f"data.absolute_winners={'true' if spec.data == 'filtered' else 'false'}",
        f"train.seed={spec.seed}", f"train.max_steps={args.steps}", f"train.checkpoint_every={args.eval_every}",
        f"train.keep_checkpoints={n_ckpt}", f"train.output_dir={run_dir}", "train.report=false",
        "logging.progress=false", "logging.tensorboard=false", f"train.cpu_threads={args.threads}",
        f"objective.beta={args.beta}",
        f"objective.beta_cpo={args.beta_cpo}", f"objective.cpo_lambda={args.cpo_lambda}",
        *(f"objective.{name}={getattr(args, name)}" for names in OWN_ARGS.values() for name in names
          if not name.startswith("ncp_")),
        *args.override, *scaled,
    ]
    cfg = load_config(DEFAULT_CONFIG, overrides)
    if run_dir.exists():  # a stale run (other settings, or cut off): its checkpoints must not mix in
        shutil.rmtree(run_dir)
    t0 = time.time()
    train(cfg)
    return read_run(spec, run_dir) | {"wall_s": time.time() - t0}


def read_run(spec: RunSpec, run_dir: Path, max_step: int | None = None) -> dict[str, Any]:
    """A run folder's checkpoints and per-step curves (up to ``max_step``: a run cut off later)."""
    recs = read_metrics(run_dir)
    recs = recs[:max_step] if max_step else recs
    ckpts = {int(p.name.split("-")[1]): str(p) for p in sorted(run_dir.glob("step-*")) if p.is_dir()}
    ckpts = {s: d for s, d in ckpts.items() if max_step is None or s <= max_step}
    return {"spec": asdict(spec), "checkpoints": ckpts, "step_s": [r.get("perf/step_s", float("nan")) for r in recs],
            "loss": [r.get("loss", float("nan")) for r in recs],
            "accuracy": [r.get("rewards/accuracy", float("nan")) for r in recs],
            "final_metrics": {k: v for k, v in recs[-1].items() if isinstance(v, (int, float))} if recs else {}}


def truncated(run: dict, max_step: int) -> dict:
    """A finished run as it stood at ``max_step``: scores, step times and curves up to it."""
    return run | {"scores": {s: v for s, v in run["scores"].items() if int(s) <= max_step},
                  **{k: run[k][:max_step] for k in ("step_s", "loss", "accuracy") if k in run}}


# ---------------------------------------------------------------- evaluation


class Evaluator:
    """Held-out prompts x seeds, drawn by the base pipeline with one LoRA at a time, scored by the judge."""

    def __init__(self, model_dir: Path, prompts: list[str], n_seeds: int, steps: int, guidance: float):
        from ncp.sampling import load_pipeline

        self.pipe = load_pipeline(model_dir)
        self.prompts = [p for p in prompts for _ in range(n_seeds)]
        self.seeds = [1000 + k for _ in prompts for k in range(n_seeds)]
        self.steps, self.guidance = steps, guidance
        self.base = self._score()

    def _score(self) -> list[float]:
        from ncp.sampling import generate
        from ncp.scoring.judge import judge

        imgs = generate(self.pipe, self.prompts, self.seeds, self.steps, self.guidance)
        return [judge(im, p).score for im, p in zip(imgs, self.prompts)]

    def lora(self, lora_dir: str) -> list[float]:
        self.pipe.load_lora_weights(lora_dir)
        try:
            return self._score()
        finally:
            self.pipe.unload_lora_weights()


# ---------------------------------------------------------------- analysis


def cumulative_time(step_s: list[float], step: int) -> float:
    return float(np.nansum(step_s[:step]))


def at_time(run: dict, budget: float) -> int:
    """The last evaluated step whose cumulative training time is within ``budget`` (at least the first)."""
    steps = sorted(int(s) for s in run["scores"])
    ok = [s for s in steps if cumulative_time(run["step_s"], s) <= budget + 1e-9]
    return ok[-1] if ok else steps[0]


def win_rate(ncp_runs: list[dict], lat_runs: list[dict], pick) -> dict:
    """Paired image comparisons pooled over training seeds; ``pick(ncp, lat) -> (step_ncp, step_lat)``."""
    from ncp.evaluate import paired_stats

    a, b, steps = [], [], []
    for rn, rl in zip(ncp_runs, lat_runs):
        sn, sl = pick(rn, rl)
        a += rl["scores"][str(sl)]
        b += rn["scores"][str(sn)]
        steps.append((sn, sl))
    stats = paired_stats(np.array(a), np.array(b))
    return {"win_rate": stats["win_rate"], "ci95": stats["win_rate_ci95"], "mean_diff": stats["mean_diff"],
            "mean_diff_ci95": stats["mean_diff_ci95"], "steps_ncp_latent": steps, "n": len(a)}


def training_fit(runs: list[dict], window: int = 100) -> dict | None:
    """Training accuracy per window of steps (mean over seeds), its last-fifth mean, and loss spikes (> 2)."""
    runs = [r for r in runs if r.get("accuracy")]
    if not runs:
        return None
    n = min(len(r["accuracy"]) for r in runs)
    acc = np.nanmean([r["accuracy"][:n] for r in runs], axis=0)
    starts = list(range(0, n, window))
    return {"window": window, "steps": [s + window for s in starts],
            "accuracy": [float(np.nanmean(acc[s:s + window])) for s in starts],
            "accuracy_last_fifth": float(np.nanmean(acc[n - max(1, n // 5):])),
            "loss_spikes_per_run": float(np.mean([np.sum(np.array(r["loss"][:n]) > 2.0) for r in runs]))}


def curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    steps = sorted({int(s) for r in runs for s in r["scores"]})
    means = [float(np.mean([np.mean(r["scores"][str(s)]) for r in runs if str(s) in r["scores"]])) for s in steps]
    return steps, means


def steps_to_match(ncp_runs: list[dict], lat_runs: list[dict]) -> int | None:
    steps, ncp_means = curve(ncp_runs)
    _, lat_means = curve(lat_runs)
    target = lat_means[-1]
    for s, m in zip(steps, ncp_means):
        if m >= target:
            return s
    return None


def analyse(runs: dict[str, dict], base_scores: list[float], args) -> dict:
    from ncp.evaluate import bootstrap_ci

    def group(obj: str, data: str, taps: str = "auto") -> list[dict]:
        return [runs[RunSpec(obj, data, s, taps).name] for s in range(args.seeds)
                if RunSpec(obj, data, s, taps).name in runs]

    out: dict[str, Any] = {"base_reward": float(np.mean(base_scores)), "base_reward_ci95": bootstrap_ci(base_scores),
                           "table1": [], "curves": {}, "final": {}, "taps": [], "training": {}}
    for data in args.data:
        for obj in args.objectives:
            g = group(obj, data)
            if not g:
                continue
            steps, means = curve(g)
            times = [float(np.mean([cumulative_time(r["step_s"], s) for r in g])) for s in steps]
            out["curves"][f"{obj}/{data}"] = {"steps": steps, "reward": means, "train_s": times}
            final = [x for r in g for x in r["scores"][str(max(int(k) for k in r["scores"]))]]
            out["final"][f"{obj}/{data}"] = {"reward": float(np.mean(final)), "ci95": bootstrap_ci(final),
                                             "step_s": float(np.nanmean([np.nanmean(r["step_s"]) for r in g])),
                                             "gain_over_base": float(np.mean(final) - np.mean(base_scores)),
                                             "seeds": len(g)}
            fit = training_fit(g)
            if fit is not None:
                out["training"][f"{obj}/{data}"] = fit
        for ncp, lat in comparisons(args.objectives):
            gn, gl = group(ncp, data), group(lat, data)
            if not gn or not gl or len(gn) != len(gl):
                continue
            last = lambda r: max(int(k) for k in r["scores"])  # noqa: E731
            eq_steps = win_rate(gn, gl, lambda rn, rl: (last(rn), last(rl)))

            def eq_time(rn, rl):
                budget = min(cumulative_time(rn["step_s"], last(rn)), cumulative_time(rl["step_s"], last(rl)))
                return at_time(rn, budget), at_time(rl, budget)

            out["table1"].append({"ncp": ncp, "latent": lat, "data": data, "equal_steps": eq_steps,
                                  "equal_time": win_rate(gn, gl, eq_time), "steps_to_match": steps_to_match(gn, gl),
                                  "seeds": len(gn)})
    for taps in args.taps:
        g = group("ncp-dpo", "filtered", "auto" if taps == "mid" else taps)
        gl = group("dpo", "filtered")
        if not g:
            continue
        last = lambda r: max(int(k) for k in r["scores"])  # noqa: E731
        final = [x for r in g for x in r["scores"][str(last(r))]]
        entry = {"taps": taps, "reward": float(np.mean(final)), "ci95": bootstrap_ci(final),
                 "step_s": float(np.nanmean([np.nanmean(r["step_s"]) for r in g]))}
        if gl and len(gl) == len(g):
            entry["vs_dpo_equal_steps"] = win_rate(g, gl, lambda rn, rl: (last(rn), last(rl)))
        out["taps"].append(entry)
    return out


# ---------------------------------------------------------------- output


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def format_tables(res: dict) -> str:
    lines = [f"base model reward (judge): {res['base_reward']:.4f} "
             f"[{res['base_reward_ci95'][0]:.4f}, {res['base_reward_ci95'][1]:.4f}]", "",
             "Win rate of each NCP objective over its latent counterpart (judge, held-out prompts; 95% CI)",
             f"{'pair':<18} {'data':<9} {'equal steps':>22} {'equal wall time':>22} {'steps to match':>15} seeds"]
    for row in res["table1"]:
        es, et = row["equal_steps"], row["equal_time"]
        lines.append(f"{row['ncp'] + ' vs ' + row['latent']:<18} {row['data']:<9} "
                     f"{pct(es['win_rate'])}% [{pct(es['ci95'][0])},{pct(es['ci95'][1])}] "
                     f"{pct(et['win_rate'])}% [{pct(et['ci95'][0])},{pct(et['ci95'][1])}] "
                     f"{str(row['steps_to_match'] or 'not reached'):>15} {row['seeds']:>5}")
    lines += ["", "Final reward per objective (mean over seeds and images; 95% CI) and mean step time",
              f"{'objective/data':<22} {'reward':>8} {'95% CI':>18} {'step s':>8}"]
    for k, v in res["final"].items():
        lines.append(f"{k:<22} {v['reward']:8.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] {v['step_s']:8.2f}")
    if res.get("training"):
        lines += ["", "Training fit: implicit accuracy (mean over seeds) in the last fifth of the steps, and steps "
                      "with loss > 2 per run", f"{'objective/data':<22} {'accuracy':>9} {'spikes':>7}   accuracy per "
                                              f"{next(iter(res['training'].values()))['window']} steps"]
        for k, v in res["training"].items():
            lines.append(f"{k:<22} {v['accuracy_last_fifth']:9.3f} {v['loss_spikes_per_run']:7.1f}   "
                         + " ".join(f"{a:.2f}" for a in v["accuracy"]))
    if res["taps"]:
        lines += ["", "NCP-DPO tap presets (filtered data)",
                  f"{'taps':<12} {'reward':>8} {'95% CI':>18} {'step s':>8} {'win vs dpo (equal steps)':>28}"]
        for t in res["taps"]:
            w = t.get("vs_dpo_equal_steps")
            ws = f"{pct(w['win_rate'])}% [{pct(w['ci95'][0])},{pct(w['ci95'][1])}]" if w else "-"
            lines.append(f"{t['taps']:<12} {t['reward']:8.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] "
                         f"{t['step_s']:8.2f} {ws:>28}")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({k.split("/")[1] for k in res["curves"]})
    rows = 2 if res.get("training") else 1
    fig, axes = plt.subplots(rows, max(1, len(datas)), figsize=(5.5 * max(1, len(datas)), 4 * rows), squeeze=False)
    for ax, data in zip(axes[-1] if rows == 2 else [], datas):
        for k, fit in res["training"].items():
            obj, d = k.split("/")
            if d == data:
                ax.plot(fit["steps"], fit["accuracy"], ls="-" if obj.startswith("ncp-") else "--", label=obj)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_title(f"training accuracy ({data} data, mean over seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"implicit accuracy, {fit['window']}-step windows")
        ax.legend(fontsize=8)
    for ax, data in zip(axes[0], datas):
        for k, c in res["curves"].items():
            obj, d = k.split("/")
            if d != data:
                continue
            ax.plot([0] + c["steps"], [res["base_reward"]] + c["reward"], marker="o", ms=3,
                    ls="-" if obj.startswith("ncp-") else "--", label=obj)
        ax.axhline(res["base_reward"], color="gray", lw=0.8, ls=":")
        ax.set_title(f"judge reward vs steps ({data} data)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean judge reward, held-out prompts")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def plan(args) -> list[RunSpec]:
    # seed-major order: a run stopped early still holds complete seeds to analyse (--analyse-only)
    specs = [RunSpec(o, d, s) for s in range(args.seeds) for d in args.data for o in args.objectives]
    for s in range(args.seeds):
        for taps in args.taps:
            if taps != "mid":  # mid is what 'auto' resolves to for SD1.5-style models: the main runs
                specs.append(RunSpec("ncp-dpo", "filtered", s, taps))
    return specs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--data", default="full,filtered", help="full and/or filtered (absolute winners)")
    p.add_argument("--taps", default=",".join(TAPS), help="NCP-DPO tap presets to compare ('' to skip)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (equal for all)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-prompts", type=int, default=0, help="first N held-out prompts (0: all)")
    p.add_argument("--eval-seeds", type=int, default=1, help="images per held-out prompt")
    p.add_argument("--sample-steps", type=int, default=0, help="sampling steps (0: the world's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, training (train.cpu_threads) and sampling")
    p.add_argument("--override", action="append", default=[], help="extra section.key=value for every run")
    p.add_argument("--ncp-scale", default="auto",
                   help="multiply beta, beta_cpo and cpo_lambda of the NCP objectives by this ('auto': the measured "
                        "ratio of latent to perceptual errors of the base model; 1: the same values as latent)")
    p.add_argument("--ncp-lambda-scale", default="same",
                   help="multiply cpo_lambda of the NCP objectives by this instead ('same': --ncp-scale; 'auto': the "
                        "measured ratio of raw errors, which keeps CPO's likelihood term as heavy against the "
                        "errors as in latent CPO when --ncp-scale is set from logit differences)")
    p.add_argument("--beta", type=float, default=5000.0, help="objective.beta of every run (before --ncp-scale)")
    p.add_argument("--beta-cpo", type=float, default=5000.0)
    p.add_argument("--beta-log", type=float, default=BETA_LOG,
                   help="beta and beta_cpo of the objective@log and @log_t variants (error_scale log, log_t), both spaces")
    p.add_argument("--cpo-lambda", type=float, default=1.0)
    p.add_argument("--beta-mapo", type=float, default=0.1, help="objective.beta_mapo of mapo and ncp-mapo")
    p.add_argument("--mapo-snr", type=float, default=0.5, help="objective.mapo_snr (before --ncp-scale)")
    p.add_argument("--mapo-lambda", type=float, default=1.0, help="objective.mapo_lambda (before --ncp-lambda-scale)")
    p.add_argument("--beta-kto", type=float, default=1000.0, help="objective.beta_kto (before --ncp-scale)")
    p.add_argument("--ncp-mapo-snr", type=float, default=None,
                   help="objective.mapo_snr of ncp-mapo as it is, instead of --mapo-snr x --ncp-scale "
                        "(benchmarks/objective_scale.py measures one)")
    p.add_argument("--ncp-beta-kto", type=float, default=None,
                   help="objective.beta_kto of ncp-kto as it is, instead of --beta-kto x --ncp-scale")
    p.add_argument("--world", default=None, help="a world folder (model/, data/) instead of the bundle")
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    p.add_argument("--analyse-only", action="store_true", help="no training: tables from the finished runs")
    p.add_argument("--partial", type=int, default=0, metavar="STEP",
                   help="no training: every run taken at step STEP, finished runs truncated to it, cut-off runs "
                        "(stopped after their step-STEP checkpoint, same settings) evaluated from their checkpoints")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 1 seed, 2 prompts, dpo/ncp-dpo")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.seeds, args.eval_prompts = 2, 1, 1, 2
        args.objectives, args.taps, args.sample_steps = "dpo,ncp-dpo", "", args.sample_steps or 4
        args.data = "full"
    args.objectives = [o for o in args.objectives.split(",") if o]
    args.data = [d for d in args.data.split(",") if d]
    args.taps = [t for t in args.taps.split(",") if t]

    import logging

    import torch

    from ncp.paths import bundle_path
    from ncp.sampling import read_prompts, sampling_defaults

    logging.basicConfig(level=logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # one "no text-encoder LoRA keys" notice per checkpoint otherwise
    torch.set_num_threads(args.threads)
    t_start = time.time()
    world = Path(args.world) if args.world else bundle_path()
    model_dir = world / "model"
    prompts = read_prompts(world / "data" / "heldout_prompts.txt")
    if args.world:
        args.override = [f"model.path={model_dir}", f"data.sources=[{world / 'data' / '*.parquet'}]", *args.override]
    if args.eval_prompts:
        prompts = prompts[: args.eval_prompts]
    steps, guidance = sampling_defaults(model_dir)
    steps = args.sample_steps or steps
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs", "quick", "analyse_only", "partial")} | {
        "eval_prompt_list": prompts, "sample_steps": steps, "guidance": guidance}
    # What a finished run's result depends on: every setting but the plan (which runs, how many
    # seeds) and the thread count. Each run's result sits in its own folder, so processes with
    # different plans (say --data full and --data filtered on two cores) can share --runs.
    # (--ncp-lambda-scale came later: at its default it stays out of the key, so earlier runs keep theirs.)
    # --beta-log changes only the objective@log and @log_t runs: it joins their keys alone (run_key).
    key = json.loads(json.dumps({k: v for k, v in settings.items()
                                 if k not in (*PLAN_KEYS, "beta_log", *(a for names in OWN_ARGS.values() for a in names))
                                 and not (k == "ncp_lambda_scale" and v == "same")}))
    if "auto" in (args.ncp_scale, args.ncp_lambda_scale):
        scale_file = runs_dir / "ncp_scale.json"  # the calibration does not depend on the two options
        calib_key = {k: v for k, v in key.items() if k not in ("ncp_scale", "ncp_lambda_scale")}
        cached = _read_for_settings(scale_file, calib_key)
        if cached is not None:
            ratio = cached["ncp_scale"]
        else:
            ratio = calibrate_ncp_scale(args, runs_dir)
            _write_json_atomic(scale_file, {"settings": calib_key, "ncp_scale": ratio})
        print(f"latent ERR / perceptual PL of the base model: {ratio:.4g}", flush=True)
        args.ncp_scale = ratio if args.ncp_scale == "auto" else args.ncp_scale
        args.ncp_lambda_scale = ratio if args.ncp_lambda_scale == "auto" else args.ncp_lambda_scale
    args.ncp_scale = float(args.ncp_scale)
    args.ncp_lambda_scale = args.ncp_scale if args.ncp_lambda_scale == "same" else float(args.ncp_lambda_scale)
    evaluator = Evaluator(model_dir, prompts, args.eval_seeds, steps, guidance)
    specs = plan(args)
    runs: dict[str, dict] = {}
    for i, spec in enumerate(specs):
        result_file = runs_dir / spec.name / "result.json"
        run_key = key | ({"beta_log": args.beta_log} if split_objective(spec.objective)[1] != "paper" else {})
        run_key |= {a: getattr(args, a) for a in OWN_ARGS.get(latent_counterpart(spec.objective), ())}
        cached = _read_for_settings(result_file, run_key)
        if cached is not None:
            runs[spec.name] = cached["run"]
            continue
        if args.partial:  # a run cut off after its checkpoint at step --partial: evaluate what it has
            partial_file = runs_dir / spec.name / f"partial-{args.partial}.json"
            cached = _read_for_settings(partial_file, run_key)
            if cached is None and (runs_dir / spec.name / f"step-{args.partial:06d}").is_dir():
                run = read_run(spec, runs_dir / spec.name, args.partial)
                run["scores"] = {str(s): evaluator.lora(d) for s, d in sorted(run.pop("checkpoints").items())}
                cached = {"settings": run_key, "run": run}
                _write_json_atomic(partial_file, cached)
            if cached is not None:
                runs[spec.name] = cached["run"]
            continue
        if args.analyse_only:
            continue
        t0 = time.time()
        run = train_run(spec, args, runs_dir / spec.name)
        run["scores"] = {str(s): evaluator.lora(d) for s, d in sorted(run.pop("checkpoints").items())}
        runs[spec.name] = run
        _write_json_atomic(result_file, {"settings": run_key, "run": run})
        last = run["scores"][str(max(int(k) for k in run["scores"]))]
        print(f"[{i + 1}/{len(specs)}] {spec.name}: final reward {np.mean(last):.4f} "
              f"(base {np.mean(evaluator.base):.4f}), {time.time() - t0:.0f}s", flush=True)
    if args.partial:
        runs = {name: truncated(run, args.partial) for name, run in runs.items()}
    res = analyse(runs, evaluator.base, args)
    res["settings"] = settings
    res["ncp_scale"] = args.ncp_scale
    res["ncp_lambda_scale"] = args.ncp_lambda_scale
    res["partial_step"] = args.partial or None
    return write_result(res, Path(args.out), t_start, args.threads, plot, format_tables)


if __name__ == "__main__":
    main()
