"""Issue 22, part 5: shipped offline pairs, one offline round of generated pairs and on-policy rounds, for one
objective on one world, at equal wall time, scored by the world's judge on its held-out prompts.

    python benchmarks/onpolicy.py --world bundle --objective kto --rounds 3 --round-steps 150 \\
        --images-per-prompt 2 --runs runs/op-kto --out benchmarks/results/onpolicy_bundle_kto.json

(c) ``on-policy``: ``python -m ncp.onpolicy`` with R rounds of K steps (round r samples the world's training
prompts with round r - 1's LoRA, the judge scores them, best-vs-worst pairs, K steps from round r - 1's
checkpoint); its wall time T (sampling, scoring, training, every model load) is the budget.
(b) ``generated-offline``: one round of generated pairs from the base model (exactly (c)'s round 0
samples, reused), trained for as many steps as T minus that round's generation time buys at (c)'s
seconds per step. (a) ``shipped``: the world's shipped pairs with the default recipe (absolute winners),
for T at (c)'s seconds per step. The held-out prompts are never sampled for training.

Every LoRA then draws the held-out prompts x ``--eval-seeds`` (the same noise for all) and the judge
scores each image; the judge's two parts, prompt alignment and visual quality, are reported apart (a
reward-hacking check: a policy that games one part shows it there). Paired bootstrap intervals over
images. Writes ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(HERE))

from quality import _write_json_atomic  # noqa: E402
from step import machine  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
PARTS = ("score", "alignment", "quality")


def world_paths(world: str) -> tuple[str, Path, Path, Path]:
    """(model.path value, model folder, training parquet, held-out prompts) of a world."""
    if world == "bundle":
        from ncp.paths import bundle_path

        return "bundle", bundle_path("model"), bundle_path("data", "train-00000.parquet"), bundle_path(
            "data", "heldout_prompts.txt")
    w = Path(world)
    return str(w / "model"), w / "model", w / "data" / "train-00000.parquet", w / "data" / "heldout_prompts.txt"


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def evaluate(model_dir: Path, loras: dict[str, str | None], prompts: list[str], n_seeds: int, threads: int) -> dict:
    import torch

    from ncp.pipelines import load_unet_lora
    from ncp.sampling import generate, load_pipeline, sampling_defaults
    from ncp.scoring.judge import judge

    torch.set_num_threads(threads)
    steps, guidance = sampling_defaults(model_dir)
    ps = [p for p in prompts for _ in range(n_seeds)]
    ss = [1000 + k for _ in prompts for k in range(n_seeds)]
    out = {}
    for name, lora in loras.items():
        pipe = load_pipeline(model_dir)
        if lora:
            load_unet_lora(pipe, lora)
        js = [judge(im, p) for im, p in zip(generate(pipe, ps, ss, steps, guidance), ps)]
        out[name] = {part: [float(getattr(j, part)) for j in js] for part in PARTS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="bundle", help="'bundle' or a world folder (python -m ncp.world build)")
    ap.add_argument("--objective", default="kto")
    ap.add_argument("--overrides", default="", help="comma list of section.key=value for every training run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--round-steps", type=int, default=150)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--max-prompts", type=int, default=0, help="training prompts sampled a round (0: all; smoke runs)")
    ap.add_argument("--eval-prompts", type=int, default=0, help="the first N held-out prompts (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from ncp.evaluate import paired_stats, summarize
    from ncp.sampling import read_prompts

    model_path, model_dir, train_parquet, heldout = world_paths(a.world)
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    objective = [f"objective.name={a.objective}"] + [o for o in a.overrides.split(",") if o]
    # every run on the world's recipe (default.yaml), whichever world: a model folder alone would get its family's
    common = ["--config", "default"] + objective + [f"model.path={model_path}", "train.report=false", "logging.progress=false",
                          "logging.tensorboard=false", f"train.cpu_threads={a.threads}", f"train.seed={a.seed}"]
    py = sys.executable

    # (c) on-policy rounds: the budget
    c_dir = runs / "on-policy"
    t_c = sh([py, "-m", "ncp.onpolicy", "--out", str(c_dir), "--rounds", str(a.rounds), "--round-steps",
              str(a.round_steps), "--model", model_path, "--prompts", str(train_parquet), "--exclude", str(heldout),
              "-n", str(a.images_per_prompt), "--max-prompts", str(a.max_prompts), "--threads", str(a.threads), "--seed", str(a.seed), *common],
             runs / "on-policy.log")
    summary = json.loads((c_dir / "summary.json").read_text())
    rounds = summary["rounds"]
    budget = sum(r["generate_s"] + r["train_s"] for r in rounds)
    s_per_step = sum(r["train_s"] for r in rounds) / (a.rounds * a.round_steps)
    gen0 = rounds[0]["generate_s"]

    # (b) one offline round of generated pairs: (c)'s round 0 samples, the rest of the budget in steps
    steps_b = max(1, round((budget - gen0) / s_per_step))
    b_dir = runs / "generated-offline"
    t_b = sh([py, "-m", "ncp.train", *common, f"train.max_steps={steps_b}", f"train.output_dir={b_dir}",
              f"data.sources=[{c_dir / 'round-000' / 'generate' / 'pairs'}/*.parquet]", "data.absolute_winners=false",
              "train.checkpoint_every=0", "--overwrite"], runs / "generated-offline.log")

    # (a) the shipped pairs, the whole budget in steps
    steps_a = max(1, round(budget / s_per_step))
    a_dir = runs / "shipped"
    t_a = sh([py, "-m", "ncp.train", *common, f"train.max_steps={steps_a}", f"train.output_dir={a_dir}",
              f"data.sources=[{train_parquet}]", "train.checkpoint_every=0", "--overwrite"], runs / "shipped.log")

    prompts = read_prompts(heldout)[: a.eval_prompts or None]
    t0 = time.perf_counter()
    scores = evaluate(model_dir, {"base": None, "shipped": str(a_dir / "lora"),
                                  "generated-offline": str(b_dir / "lora"), "on-policy": str(c_dir / "lora")},
                      prompts, a.eval_seeds, a.threads)
    t_eval = time.perf_counter() - t0
    variants = {
        "shipped": {"steps": steps_a, "wall_s": t_a, "gen_s": 0.0},
        "generated-offline": {"steps": steps_b, "wall_s": t_b + gen0, "gen_s": gen0},
        "on-policy": {"steps": a.rounds * a.round_steps, "wall_s": budget, "gen_s": sum(r["generate_s"] for r in rounds),
                      "rounds": rounds},
    }
    table = {}
    for name in ("base", *variants):
        table[name] = {part: summarize(np.array(scores[name][part])) for part in PARTS}
        if name != "base":
            table[name]["vs_base"] = {part: paired_stats(np.array(scores["base"][part]), np.array(scores[name][part]))
                                      for part in PARTS}
    comparisons = {f"{x} vs {y}": {part: paired_stats(np.array(scores[y][part]), np.array(scores[x][part]))
                                   for part in PARTS}
                   for x, y in (("on-policy", "shipped"), ("on-policy", "generated-offline"),
                                ("generated-offline", "shipped"))}
    result = {"benchmark": "onpolicy", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine("cpu"), "command": " ".join(sys.argv), "settings": vars(a),
              "budget_s": budget, "s_per_step": s_per_step, "on_policy_wall_s": t_c, "eval_s": t_eval,
              "variants": variants, "rewards": table, "comparisons": comparisons, "scores": scores}
    _write_json_atomic(Path(a.out), result, indent=2)

    print(f"\n{a.world}, {a.objective}: budget {budget:.0f} s ({s_per_step:.3f} s a step)")
    print(f"| variant | steps | wall s | judge reward | gain over base [95 %] | alignment gain | quality gain |")
    print("|---|---|---|---|---|---|---|")
    print(f"| base | 0 | - | {table['base']['score']['mean']:.4f} | | | |")
    for name, v in variants.items():
        vb = table[name]["vs_base"]
        cells = [f"{vb[p]['mean_diff']:+.4f} [{vb[p]['mean_diff_ci95'][0]:+.4f}, {vb[p]['mean_diff_ci95'][1]:+.4f}]"
                 for p in PARTS]
        print(f"| {name} | {v['steps']} | {v['wall_s']:.0f} | {table[name]['score']['mean']:.4f} | {' | '.join(cells)} |")
    for k, c in comparisons.items():
        s = c["score"]
        print(f"{k}: mean difference {s['mean_diff']:+.4f} [{s['mean_diff_ci95'][0]:+.4f}, {s['mean_diff_ci95'][1]:+.4f}], "
              f"win rate {100 * s['win_rate']:.1f} % [{100 * s['win_rate_ci95'][0]:.1f}, {100 * s['win_rate_ci95'][1]:.1f}]")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
