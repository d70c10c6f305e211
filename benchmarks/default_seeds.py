"""The default run over several training seeds: `python -m ncp.train [overrides] train.seed=k`, k = 0..n-1.

Each run is the README's main command (train, then the judge's report of base vs
aligned on the held-out prompts); this collects every seed's gain over the base
with its bootstrap 95 % interval, the mean gain over seeds, and the wall time of
each run, prints a table and writes JSON. A seed whose ``report.json`` already
exists under ``--runs`` for the same overrides is not run again.

    python benchmarks/default_seeds.py --seeds 5                       # the shipped default
    python benchmarks/default_seeds.py --seeds 5 --name log objective.error_scale=log objective.beta=100
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from goals import goal  # noqa: E402  (benchmarks/goals.yaml)


def run_seed(seed: int, overrides: list[str], out_dir: Path) -> dict:
    """One default run in a fresh process (as a user runs it); its report plus the wall time."""
    marker = out_dir / "overrides.json"
    report = out_dir / "report.json"
    if report.is_file() and marker.is_file() and json.loads(marker.read_text()) == overrides:
        return json.loads(report.read_text()) | json.loads((out_dir / "wall.json").read_text())
    cmd = [sys.executable, "-m", "ncp.train", *overrides, f"train.seed={seed}", f"train.output_dir={out_dir}",
           "logging.progress=false", "--overwrite"]  # a run of other overrides may be there: start afresh
    t0 = time.time()
    subprocess.run(cmd, check=True, env=os.environ | {"PYTHONPATH": str(HERE.parent / "python")})
    wall = {"wall_s": round(time.time() - t0, 1)}
    marker.write_text(json.dumps(overrides))
    (out_dir / "wall.json").write_text(json.dumps(wall))
    return json.loads(report.read_text()) | wall


def goals(summary: dict) -> dict[str, bool]:
    """Issue 15's goal for the default run (benchmarks/goals.yaml), in the JSON (the printed lines are unchanged)."""
    g = goal("default_run.mean_gain")
    out = {f"mean gain over seeds >= +{g}": summary["mean_gain"] >= g}
    if goal("default_run.every_interval_above_0"):
        out["every seed's interval above 0"] = summary["seeds_with_interval_above_0"] == len(summary["seeds"])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--name", default="default", help="a label for this setting (run folders, JSON)")
    p.add_argument("--runs", default="runs/default_seeds")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/default_seeds_<name>.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    rows = []
    for seed in range(args.seeds):
        rep = run_seed(seed, args.overrides, Path(args.runs) / args.name / f"seed{seed}")
        rows.append({"seed": seed, "base": rep["base_reward"], "aligned": rep["aligned_reward"], "gain": rep["diff"],
                     "gain_ci95": rep["diff_ci95"], "win_rate": rep["win_rate"], "wall_s": rep["wall_s"]})
        r = rows[-1]
        print(f"seed {seed}: gain {r['gain']:+.4f} [{r['gain_ci95'][0]:+.4f}, {r['gain_ci95'][1]:+.4f}], "
              f"win rate {100 * r['win_rate']:.1f} %, {r['wall_s']:.0f} s", flush=True)
    gains = np.array([r["gain"] for r in rows])
    summary = {"name": args.name, "overrides": args.overrides, "seeds": rows, "mean_gain": float(gains.mean()),
               "seeds_with_interval_above_0": int(sum(r["gain_ci95"][0] > 0 for r in rows)),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": "python benchmarks/default_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    summary["goals"] = goals(summary)
    print(f"{args.name}: mean gain over {len(rows)} seeds {summary['mean_gain']:+.4f}; "
          f"{summary['seeds_with_interval_above_0']} of {len(rows)} intervals above 0")
    out = Path(args.out or HERE / "results" / f"default_seeds_{args.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
