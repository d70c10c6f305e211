"""The README's main job, timed as a user runs it: ``python -m ncp.train`` with no arguments (the bundled
world's recipe), once per setting of ``train.cpu_threads``, each in its own process, one after another.

For each run: the wall time of the whole command, the training part (first to last logged step), the
median and the 10th-90th percentile of the per-step time, the report's time (its sampling and judging,
``report.json``'s ``seconds``), and the peak RSS. Run it on an idle machine: the figures are only as
quiet as the machine is (the JSON records the load average before and after each run).

    python benchmarks/main_job.py --threads 1,2 --out benchmarks/results/main_job.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from step import machine  # noqa: E402  (the machine description every benchmark JSON carries)


def run_once(threads: int, out_dir: Path, extra: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "ncp.train", f"train.output_dir={out_dir}", f"train.cpu_threads={threads}",
           "logging.progress=false", *extra]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the main job failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = sorted(r["perf/step_s"] for r in records if "perf/step_s" in r)
    report = json.loads((out_dir / "report.json").read_text())
    decile = lambda q: steps[min(len(steps) - 1, int(q * len(steps)))]  # noqa: E731
    return {"threads": threads, "wall_s": round(wall, 1), "steps": len(steps),
            "train_s": round(sum(steps), 1), "step_median_s": round(statistics.median(steps), 4),
            "step_p10_s": round(decile(0.1), 4), "step_p90_s": round(decile(0.9), 4),
            "report_s": report.get("seconds"), "gain": report.get("diff"), "gain_ci95": report.get("diff_ci95"),
            "setup_and_export_s": round(wall - sum(steps) - (report.get("seconds") or 0), 1),
            "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join(["python", "-m", "ncp.train", *cmd[3:]])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="train.cpu_threads settings, comma-separated")
    p.add_argument("--override", action="append", default=[], help="section.key=value for every run")
    p.add_argument("--out", default=str(HERE / "results" / "main_job.json"))
    args = p.parse_args(argv)
    rows = []
    for threads in [int(t) for t in args.threads.split(",") if t]:
        tmp = Path(tempfile.mkdtemp(prefix=f"main-job-t{threads}-"))
        try:
            rows.append(run_once(threads, tmp / "run", args.override))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r = rows[-1]
        print(f"threads {threads}: wall {r['wall_s'] / 60:.1f} min = training {r['train_s']:.0f} s "
              f"({r['steps']} steps, median {r['step_median_s']:.3f} s, p10-p90 {r['step_p10_s']:.3f}-"
              f"{r['step_p90_s']:.3f}) + report {r['report_s']} s + setup/export {r['setup_and_export_s']} s; "
              f"gain {r['gain']:+.4f}", flush=True)
    result = {"runs": rows, "machine": machine("cpu"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/main_job.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
