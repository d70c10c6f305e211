"""The report at the end of a training run on a world built by ``python -m ncp.world build``.

``after_training`` draws the held-out prompts with the base model and with the
trained LoRA on the same seeds, scores both with the judge
(``ncp.scoring.judge``), and writes ``grid.png`` (base vs aligned),
``curves.png`` (the curves a user reads, see ``curve_panels``) and
``report.json``. It prints and returns the judge's mean reward of both and the
paired difference with its bootstrap 95% interval.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ncp.evaluate import format_table, generate_both, score_and_report, write_grid
from ncp.sampling import read_prompts, sampling_defaults
from ncp.scoring import JudgeScorer

# The panels of curves.png, in order: (title, metric keys drawn on it). A panel is drawn when one of its keys
# is logged and varies; the validation panel (no fixed keys) takes every val/ or validation/ key
# with "reward" in it.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("rewards/accuracy", ("rewards/accuracy",)),
    ("rewards/margin", ("rewards/margin",)),
    ("validation reward", ()),
    ("train/grad_norm", ("train/grad_norm",)),
    ("perf/pairs_per_s", ("perf/pairs_per_s",)),
    ("perf/step_s", ("perf/step_s",)),
)


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """JSONL records (one object a line); unreadable lines are skipped."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_validation_reward(key: str) -> bool:
    return key.split("/", 1)[0] in ("val", "validation") and "reward" in key


def curve_panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """The panels of ``curves.png`` for these records: ``PANELS``, each with its keys that are logged and
    vary (a constant series is left out), panels left empty dropped. No other key is drawn (``train/lr``,
    ``train/world_size``, ``err/*``, memory: they stay in metrics.jsonl and TensorBoard)."""
    series: dict[str, set] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and _numeric(v):
                series.setdefault(k, set()).add(float(v))
    varying = [k for k, vals in series.items() if len(vals) > 1]
    panels = []
    for title, keys in PANELS:
        keys = [k for k in varying if _is_validation_reward(k)] if not keys else [k for k in keys if k in varying]
        if keys:
            panels.append((title, keys))
    return panels


def plot_curves(records: list[dict], path: str | Path) -> Path | None:
    """The ``curve_panels`` of the records against ``step`` (else the record index); None when nothing to plot."""
    panels = curve_panels(records)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r.get("step", i), r[k]) for i, r in enumerate(records) if _numeric(r.get(k))]
            xs, ys = zip(*pts)
            label = k if len(keys) > 1 else None
            line, = ax.plot(xs, ys, lw=0.8, alpha=0.5, label=label)
            if len(ys) >= 10:  # a running mean shows the trend under noisy per-step values
                w = max(2, len(ys) // 20)
                ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=1.5, color=line.get_color())
        if len(keys) > 1:
            ax.legend(fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def after_training(model_dir: str, lora_dir: str, out_dir: str, metrics_path: str, prompts_path: str,
                   seed: int = 0, n_seeds: int | None = None) -> dict:
    """Grid, curves and the judge's base-vs-aligned reward on the held-out prompts (see module doc)."""
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps, guidance = sampling_defaults(model_dir)
    n_seeds = n_seeds or _eval_seeds(model_dir)
    prompts = read_prompts(prompts_path)
    gen = generate_both(model_dir, lora_dir, prompts, n_seeds, seed, steps, guidance)
    results = score_and_report(gen, [JudgeScorer()], seed)
    judge = results["scorers"]["judge"]
    summary = {
        "base_reward": judge["base"]["mean"],
        "aligned_reward": judge["lora"]["mean"],
        "diff": judge["lora_vs_base"]["mean_diff"],
        "diff_ci95": judge["lora_vs_base"]["mean_diff_ci95"],
        "win_rate": judge["lora_vs_base"]["win_rate"],
        "win_rate_ci95": judge["lora_vs_base"]["win_rate_ci95"],
        "n_prompts": len(prompts), "n_seeds": n_seeds, "steps": steps, "guidance": guidance,
        "grid": str(write_grid(gen, out, n_seeds)),
        "curves": str(plot_curves(read_metrics(metrics_path), out / "curves.png") or ""),
        "details": results,
    }
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    lo, hi = summary["diff_ci95"]
    print(format_table(results))
    print(f"judge reward on {len(prompts)} held-out prompts x {n_seeds} seeds: base {summary['base_reward']:.4f}, "
          f"aligned {summary['aligned_reward']:.4f}, difference {summary['diff']:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}]"
          f"{', excludes 0' if lo > 0 or hi < 0 else ', includes 0'})")
    print(f"report: {summary['grid']}, {summary['curves'] or '(no metrics to plot)'}, {out / 'report.json'}")
    return summary


def _eval_seeds(model_dir: str) -> int:
    for cand in (Path(model_dir) / "world.json", Path(model_dir).parent / "world.json"):
        if cand.is_file():
            return int(json.loads(cand.read_text()).get("sampling", {}).get("eval_seeds", 2))
    return 2
