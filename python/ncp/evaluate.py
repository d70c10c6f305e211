"""Compare a base text-to-image model with and without a LoRA on a prompt file.

``python -m ncp.evaluate --model DIR [--lora DIR] --prompts FILE --scorers judge,pickscore:DIR,hps:DIR --out DIR``

Both variants draw every (prompt, seed) with the same noise. Each scorer gives
one number per image; the report holds each variant's mean with a bootstrap
95% interval, and, with a LoRA, the mean paired difference and the win rate of
the LoRA over the base (ties count 1/2), each with its interval. Writes
``results.json`` and ``grid.png`` under ``--out``.

Scorers:
- ``judge``: the bundled programmatic judge, ``ncp.scoring.judge`` (prompt
  alignment and visual quality from pixels; prompts outside its grammar get
  quality only);
- ``pickscore:DIR``: PickScore-style, ``logit_scale * cos(image, text)`` of a
  ``CLIPModel`` + ``CLIPProcessor`` saved in DIR;
- ``hps:DIR``: HPSv2-style, ``cos(image, text)`` of a CLIP model in DIR.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ncp.pipelines import load_unet_lora
from ncp.sampling import generate, load_pipeline, read_prompts, sampling_defaults, save_grid
from ncp.scoring import Scorer, make_scorers


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_stats(base: np.ndarray, other: np.ndarray, seed: int = 0) -> dict:
    """Mean difference (other - base) and win rate of other over base (ties 1/2), with 95% intervals."""
    diff = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    wins = (diff > 0) + 0.5 * (diff == 0)
    return {"mean_diff": float(diff.mean()), "mean_diff_ci95": bootstrap_ci(diff, seed=seed),
            "win_rate": float(wins.mean()), "win_rate_ci95": bootstrap_ci(wins, seed=seed + 1)}


def summarize(scores: np.ndarray) -> dict:
    return {"mean": float(np.mean(scores)), "ci95": bootstrap_ci(scores), "n": int(len(scores))}


@dataclass
class Generated:
    prompts: list[str]  # one per image
    seeds: list[int]
    base: list[np.ndarray]
    lora: list[np.ndarray] | None


def generate_both(model_dir: str, lora_dir: str | None, prompts: list[str], n_seeds: int, seed: int,
                  steps: int, guidance: float, batch_size: int = 64) -> Generated:
    """Images of every (prompt, seed) from the base model, then with the LoRA, on the same noise."""
    ps = [p for p in prompts for _ in range(n_seeds)]
    ss = [seed * 1000 + k for _ in prompts for k in range(n_seeds)]
    pipe = load_pipeline(model_dir)
    base = generate(pipe, ps, ss, steps, guidance, batch_size, desc="base")
    lora = None
    if lora_dir:
        load_unet_lora(pipe, lora_dir)
        lora = generate(pipe, ps, ss, steps, guidance, batch_size, desc="lora")
    return Generated(ps, ss, base, lora)


def score_and_report(gen: Generated, scorers: list[Scorer], seed: int = 0) -> dict:
    results: dict = {"n_images": len(gen.base), "scorers": {}}
    for sc in scorers:
        b = sc(gen.base, gen.prompts)
        entry = {"base": summarize(b)}
        if gen.lora is not None:
            lo = sc(gen.lora, gen.prompts)
            entry["lora"] = summarize(lo)
            entry["lora_vs_base"] = paired_stats(b, lo, seed)
        results["scorers"][sc.name] = entry
    return results


def write_grid(gen: Generated, out: Path, n_seeds: int, max_prompts: int = 8, max_seeds: int = 3) -> Path:
    rows, k = [], min(n_seeds, max_seeds)
    for i in range(0, min(len(gen.prompts), max_prompts * n_seeds), n_seeds):
        imgs = []
        for s in range(k):
            imgs.append(gen.base[i + s])
            if gen.lora is not None:
                imgs.append(gen.lora[i + s])
        rows.append((gen.prompts[i], imgs))
    titles = [f"{v} s{s}" for s in range(k) for v in (["base", "lora"] if gen.lora is not None else ["base"])]
    path = out / "grid.png"
    save_grid(path, rows, titles)
    return path


def format_table(results: dict) -> str:
    lines = [f"{'scorer':<22} {'base':>20} {'lora':>20} {'lora - base':>26} {'lora win rate':>22}"]
    for name, e in results["scorers"].items():
        def ms(d):
            return f"{d['mean']:.4f} [{d['ci95'][0]:.3f},{d['ci95'][1]:.3f}]"
        row = f"{name:<22} {ms(e['base']):>20}"
        if "lora" in e:
            c = e["lora_vs_base"]
            row += f" {ms(e['lora']):>20} {c['mean_diff']:+.4f} [{c['mean_diff_ci95'][0]:+.3f},{c['mean_diff_ci95'][1]:+.3f}]"
            row += f" {100 * c['win_rate']:5.1f}% [{100 * c['win_rate_ci95'][0]:.1f},{100 * c['win_rate_ci95'][1]:.1f}]"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ncp.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers pipeline folder of the base model")
    parser.add_argument("--lora", default=None, help="LoRA folder (pytorch_lora_weights.safetensors)")
    parser.add_argument("--prompts", required=True, help=".txt (one a line) or .tsv/.csv with a prompt column")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--scorers", default="judge", help="comma list: judge, pickscore:DIR, hps:DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt (seeds seed*1000 + k)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the world's, else 20)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the world's, else 3.0)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts, args.prompt_column)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    steps, guidance = sampling_defaults(args.model)
    steps, guidance = args.steps or steps, args.guidance if args.guidance is not None else guidance
    scorers = make_scorers(args.scorers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = generate_both(args.model, args.lora, prompts, args.seeds, args.seed, steps, guidance, args.batch_size)
    results = score_and_report(gen, scorers, args.seed)
    results |= {"model": args.model, "lora": args.lora, "prompts": args.prompts, "n_prompts": len(prompts),
                "seeds": args.seeds, "steps": steps, "guidance": guidance}
    results["grid"] = str(write_grid(gen, out, args.seeds))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {results['grid']}")
    return results


if __name__ == "__main__":
    main()
