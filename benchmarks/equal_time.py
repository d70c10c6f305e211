"""An objective at the default run's wall-time budget: its step time against the default's, side by side, then
the default run's 5-seed protocol at the steps that budget buys.

Issue 26 asks whether the best NCP objective "gains at least as much per minute as KTO". Equal steps
favour the costlier objective (NCP's encoder passes make its step slower), so this gives it the
default's *time*. The default trains ``--base-steps`` steps of ``--base`` (the shipped KTO, 600 steps).
First ``--rounds`` short ABAB runs of each objective (``python -m ncp.train``, ``--probe-steps`` steps,
one training thread, the first ``--warmup`` steps not counted) measure the median step time of both in the
same minutes of the same machine. Their ratio turns the default's steps into the candidate's:
``steps = round(base_steps * t_base / t_candidate)``. Then ``default_seeds.py`` trains the candidate
with those steps for each seed, writes its report and the gain over the base with its interval, and this
compares the mean gain with the default's committed 5-seed record (``--base-record``): at equal time,
gain per minute compares as gain does. Each seed's training minutes (its summed step times) are kept.

    python benchmarks/equal_time.py --name ncp-kto-coef --seeds 0,1,2,3,4 \\
        objective.name=ncp-kto objective.taps=[mid] objective.error_scale=coef objective.beta_kto=130

``--seeds`` takes a comma list so that two processes (one per core) can share ``--runs``; each seed's
report is kept under ``<runs>/<name>/seed<k>`` and reused by any later call with the same overrides, so
a final call with every seed collects them. ``--ratio`` skips the timing (a ratio measured before).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from default_seeds import run_seed  # noqa: E402
from quality import _write_json_atomic, read_metrics  # noqa: E402

ENV = os.environ | {"PYTHONPATH": str(HERE.parent / "python")}
# The default run's recipe that the candidate keeps (python/ncp/configs/default.yaml, with the 5-seed
# record's one training thread); the candidate's overrides come after these and win.
COMMON = ["data.absolute_winners=true", "train.cpu_threads=1"]


def step_time(overrides: list[str], steps: int, warmup: int) -> float:
    """Median ``perf/step_s`` of a short training run of ``overrides``, the first ``warmup`` steps dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ncp.train", *COMMON, *overrides, f"train.max_steps={steps}",
               f"train.output_dir={tmp}", "train.report=false", "logging.progress=false", "--overwrite"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = read_metrics(Path(tmp))
    times = [r["perf/step_s"] for r in rows if "perf/step_s" in r][warmup:]
    if not times:
        raise SystemExit(f"{' '.join(cmd)}: no perf/step_s after {warmup} warm-up steps")
    return statistics.median(times)


def measure_ratio(base: list[str], cand: list[str], rounds: int, steps: int, warmup: int) -> dict:
    """ABAB: each round one short run of the default, then one of the candidate; medians over rounds."""
    tb, tc = [], []
    for r in range(rounds):
        tb.append(step_time(base, steps, warmup))
        tc.append(step_time(cand, steps, warmup))
        print(f"round {r}: {base[0]} {tb[-1]:.3f} s/step, candidate {tc[-1]:.3f} s/step", flush=True)
    return {"base_step_s": tb, "candidate_step_s": tc, "ratio": statistics.median(tb) / statistics.median(tc),
            "rounds": rounds, "probe_steps": steps, "warmup": warmup}


def equal_steps(base_steps: int, ratio: float) -> int:
    """The candidate's steps in the time of the default's ``base_steps``: ``ratio`` is t_base / t_candidate."""
    if ratio <= 0:
        raise SystemExit(f"step-time ratio {ratio}: must be positive")
    return max(1, round(base_steps * ratio))


def training_minutes(run_dir: Path) -> float:
    """Sum of the run's logged step times (training only: no setup, export or report), in minutes."""
    return sum(r["perf/step_s"] for r in read_metrics(run_dir) if "perf/step_s" in r) / 60


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="a label for the candidate (run folders, JSON)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated")
    p.add_argument("--base", default="objective.name=kto", help="the default's objective override")
    p.add_argument("--base-steps", type=int, default=600, help="the default's steps")
    p.add_argument("--base-record", default=str(HERE / "results" / "default_seeds_kto600.json"),
                   help="the default's 5-seed record (default_seeds.py JSON) for its gain per minute")
    p.add_argument("--ratio", type=float, help="t_base / t_candidate measured before (skips the timing)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--probe-steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--runs", default="runs/equal_time")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/equal_time_<name>.json)")
    p.add_argument("overrides", nargs="+", metavar="section.key=value")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    base = [args.base]
    runs = Path(args.runs) / args.name
    runs.mkdir(parents=True, exist_ok=True)
    timing_file = runs / "timing.json"
    if args.ratio is not None:
        timing = {"ratio": args.ratio, "given": True}
    elif timing_file.is_file():
        timing = json.loads(timing_file.read_text())
    else:
        timing = measure_ratio(base, args.overrides, args.rounds, args.probe_steps, args.warmup)
        _write_json_atomic(timing_file, timing)
    steps = equal_steps(args.base_steps, timing["ratio"])
    print(f"step-time ratio {timing['ratio']:.3f}: {args.name} gets {steps} steps for the default's "
          f"{args.base_steps}", flush=True)
    overrides = [*COMMON, *args.overrides, f"train.max_steps={steps}", "train.report=true"]
    rows = []
    for seed in seeds:
        run_dir = runs / f"seed{seed}"
        rep = run_seed(seed, overrides, run_dir)
        rows.append({"seed": seed, "base": rep["base_reward"], "aligned": rep["aligned_reward"], "gain": rep["diff"],
                     "gain_ci95": rep["diff_ci95"], "win_rate": rep["win_rate"], "wall_s": rep["wall_s"],
                     "train_min": round(training_minutes(run_dir), 2)})
        r = rows[-1]
        print(f"seed {seed}: gain {r['gain']:+.4f} [{r['gain_ci95'][0]:+.4f}, {r['gain_ci95'][1]:+.4f}], "
              f"{r['train_min']:.1f} training min, {r['wall_s']:.0f} s wall", flush=True)
    gains = np.array([r["gain"] for r in rows])
    record = json.loads(Path(args.base_record).read_text())
    base_gain = record["mean_gain"]
    res = {"name": args.name, "overrides": args.overrides, "steps": steps, "base_steps": args.base_steps,
           "timing": timing, "seeds": rows, "mean_gain": float(gains.mean()),
           "seeds_with_interval_above_0": int(sum(r["gain_ci95"][0] > 0 for r in rows)),
           "base_record": {"file": os.path.relpath(args.base_record, HERE), "mean_gain": base_gain,
                           "seeds": len(record["seeds"])},
           # at equal wall time the two budgets are equal, so gain per minute compares as gain does
           "gain_ratio_vs_base": float(gains.mean() / base_gain),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/equal_time.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"{args.name} at {steps} steps (the default's {args.base_steps} steps' time): mean gain "
          f"{res['mean_gain']:+.4f} over {len(rows)} seeds, {res['seeds_with_interval_above_0']} intervals above 0; "
          f"the default {base_gain:+.4f} ({res['gain_ratio_vs_base']:.2f}x)")
    out = Path(args.out or HERE / "results" / f"equal_time_{args.name}.json")
    _write_json_atomic(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
