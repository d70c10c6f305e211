"""Score a protocol run that was stopped before its end against the baseline at equal steps.

``benchmarks/protocol.py`` scores a run's checkpoints after its last step; a run stopped earlier (for the
machine's time) has checkpoints but no ``result.json``. This draws the same held-out prompts x seeds as the
protocol for each checkpoint, pairs the images with the baseline run's at the same step (same prompt,
sampling seed and training seed) and writes the rewards, the win rates with bootstrap intervals, and the
training side of the run so far (accuracy per 100 steps, steps with loss > 2, drift over the last 100 steps).

    python benchmarks/protocol_stopped.py --run runs/p26/mid-coef-s0 --baseline runs/p26/dpo-s0 \\
        --out benchmarks/results/protocol_26_mid_coef_stopped.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from protocol import drift  # noqa: E402
from quality import Evaluator, _write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the stopped run's folder (step-* checkpoints, metrics.jsonl)")
    p.add_argument("--baseline", required=True, help="a finished protocol run's folder (its result.json)")
    p.add_argument("--eval-seeds", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from ncp.evaluate import paired_stats
    from ncp.paths import bundle_path
    from ncp.sampling import read_prompts, sampling_defaults

    torch.set_num_threads(1)
    model = bundle_path() / "model"
    steps, guidance = sampling_defaults(model)
    evaluator = Evaluator(model, read_prompts(bundle_path() / "data" / "heldout_prompts.txt"), args.eval_seeds,
                          steps, guidance)
    base = json.loads((Path(args.baseline) / "result.json").read_text())["run"]
    run = Path(args.run)
    out: dict = {"run": str(run), "baseline": args.baseline, "base_reward": float(np.mean(evaluator.base)),
                 "checkpoints": {}}
    for ck in sorted(run.glob("step-*")):
        step = int(ck.name.split("-")[1])
        if str(step) not in base["scores"]:  # e.g. the checkpoint a stop signal wrote mid-interval
            print(f"{ck.name}: the baseline has no step {step}; skipped", flush=True)
            continue
        scores = evaluator.lora(str(ck))
        stats = paired_stats(np.array(base["scores"][str(step)]), np.array(scores))
        out["checkpoints"][str(step)] = {
            "reward": float(np.mean(scores)), "baseline_reward": float(np.mean(base["scores"][str(step)])),
            "vs_baseline": {k: stats[k] for k in ("win_rate", "win_rate_ci95", "mean_diff", "mean_diff_ci95")}}
        print(step, out["checkpoints"][str(step)], flush=True)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    acc = [r["rewards/accuracy"] for r in recs]
    out |= {"steps_trained": len(recs), "accuracy_per_100": [float(np.mean(acc[i:i + 100]))
                                                              for i in range(0, len(recs), 100)],
            "loss_spikes": int(sum(r["loss"] > 2 for r in recs)), "drift": drift(recs[-100:]),
            "command": "python benchmarks/protocol_stopped.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    _write_json_atomic(Path(args.out), out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
