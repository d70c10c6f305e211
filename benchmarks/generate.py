"""``ncp.generate``'s pipeline (sample -> score -> JPEG -> write, the scoring in its own process) against
sampling alone, on the same prompts and seeds, alternating A B A B in one run (a shared machine drifts).

Sampling alone runs the same loop with the scorer process off (images drawn and dropped); the pipeline
writes every shard into a fresh folder. images/s counts from the model being loaded to the last shard
written. On a CPU the scorer process takes a core of its own: the sampler gets ``--threads`` (default 1 on
a 2-core machine), the scorer ``--scorer-threads``. The goal (``goals.yaml``: generate.pipeline_over_sampling)
is the pipeline at >= 90 % of sampling alone.

    python benchmarks/generate.py --prompts 48 --images-per-prompt 4 --reps 2 --out benchmarks/results/generate.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from goals import goal  # noqa: E402
from step import machine  # noqa: E402


def goals(ratio: float) -> dict[str, bool]:
    """Each goal of goals.yaml's ``generate`` with whether ``ratio`` (pipeline / sampling images/s) meets it."""
    target = goal("generate.pipeline_over_sampling")
    return {f"generate -> score -> write >= {target:g}x sampling alone's images/s": ratio >= target}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundle")
    ap.add_argument("--prompts", type=int, default=48, help="the first N of the bundle's training prompts")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-prompts", type=int, default=16)
    ap.add_argument("--scorers", default="judge")
    ap.add_argument("--threads", type=int, default=1, help="sampler threads")
    ap.add_argument("--scorer-threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "generate.json"))
    a = ap.parse_args()

    from diffusers.utils import logging as diffusers_logging

    from ncp.generate import Runtime, Settings, run

    diffusers_logging.set_verbosity_error()
    s = Settings(model=a.model, max_prompts=a.prompts, images_per_prompt=a.images_per_prompt, scorers=a.scorers,
                 shard_prompts=a.shard_prompts, dtype="fp16" if a.device == "cuda" else "fp32")
    rows: dict[str, list[dict]] = {"sampling": [], "pipeline": []}
    for rep in range(a.reps):
        for mode in ("sampling", "pipeline"):
            rt = Runtime(batch_size=a.batch_size, device=a.device, threads=a.threads, scorer_threads=a.scorer_threads,
                         score=mode == "pipeline")
            tmp = Path(tempfile.mkdtemp(prefix="ncp-genbench-"))
            try:
                res = run(tmp, s, rt, pairs="best-worst")
                stats = res["sampling"] if mode == "pipeline" else res
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            rows[mode].append({"rep": rep, "images": stats["images_sampled"], "wall_s": stats["wall_s"],
                               "images_per_s": stats["images_per_s"], "scoring_s": stats.get("scoring_s")})
            print(f"rep {rep} {mode:<9} {stats['images_sampled']} images {stats['wall_s']:7.1f} s "
                  f"{stats['images_per_s']:6.2f} images/s", flush=True)
    med = {m: statistics.median(r["images_per_s"] for r in rows[m]) for m in rows}
    ratios = [p["images_per_s"] / q["images_per_s"] for p, q in zip(rows["pipeline"], rows["sampling"])]
    ratio = statistics.median(ratios)
    met = goals(ratio)
    print(f"\n| mode | images/s (median of {a.reps}) |\n|---|---|")
    for m in rows:
        print(f"| {m} | {med[m]:.2f} |")
    print(f"| pipeline / sampling | {ratio:.3f} (per rep: {', '.join(f'{r:.3f}' for r in ratios)}) |")
    for name, ok in met.items():
        print(f"{name}: {'met' if ok else 'not met'}")
    result = {"benchmark": "generate", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(a.device), "command": " ".join(sys.argv), "settings": vars(a), "runs": rows,
              "images_per_s_median": med, "pipeline_over_sampling": ratio, "per_rep_ratio": ratios,
              "goals": met}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
