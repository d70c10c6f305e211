"""``python -m ncp.onpolicy``: on-policy preference training in rounds (generate, score, pair, train; repeat).

    python -m ncp.onpolicy --out runs/op --rounds 4 --round-steps 150 [--prompts bundle] [--scorers judge] \\
        [--images-per-prompt 4] [--pairs best-worst] [--config default] [section.key=value ...]

Round ``r`` samples the prompts with the policy as round ``r - 1`` left it (round 0: the base model), scores
and pairs the images (``ncp.generate``), and trains ``--round-steps`` optimizer steps on them
(``ncp.train``), starting from round ``r - 1``'s last checkpoint (its LoRA and optimizer moments:
``train.init_from``). The reference stays the base model (adapters off) in every round. Any objective
trains (the overrides go to every round's ``ncp.train``); ``--unpaired quantile:Q`` gives KTO unpaired
labels instead of pairs. ``--rounds 1`` is one offline round of generated pairs.

Layout of ``--out``: ``onpolicy.json`` (the settings; a resumed run must match them), ``round-000/generate``
(an ``ncp.generate`` folder), ``round-000/train`` (an ``ncp.train`` run), ``round-000/done.json`` (the
round's timings and rewards), ``lora/`` (the last round's LoRA) and ``summary.json``. Every step resumes:
a killed run started again with the same command skips the finished rounds, the written sample shards and
the training steps already checkpointed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger("ncp.onpolicy")


@dataclass
class RoundsSettings:
    rounds: int = 4
    round_steps: int = 150
    seed: int = 0
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    pairs: str = "best-worst"
    tie_margin: float = 0.0
    unpaired: str | None = None


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:03d}"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def check_settings(out: Path, rs: RoundsSettings, gen: dict[str, Any]) -> None:
    mine = {"rounds": asdict(rs), "generate": gen}
    path = out / "onpolicy.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        diffs = [f"{part}.{k}: {saved.get(part, {}).get(k)!r} -> {v!r}" for part in mine for k, v in mine[part].items()
                 if saved.get(part, {}).get(k) != v and not (part == "rounds" and k == "rounds")]
        if diffs:
            from ncp.generate import GenerateError

            raise GenerateError(f"{out} holds on-policy rounds of other settings ({'; '.join(diffs)}): give another "
                                f"--out or the same settings (only --rounds may grow)")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, mine)


def train_overrides(out: Path, rs: RoundsSettings, r: int, data_dir: Path) -> list[str]:
    """The overrides of round ``r``'s ``ncp.train``: the user's, then the round's data, steps, folder, seed and
    start (the last checkpoint of round ``r - 1``)."""
    from ncp import checkpoint as ckpt

    kind = "unpaired" if rs.unpaired else "pairs"
    ov = list(rs.overrides) + [
        f"data.sources=[{data_dir / kind}/*.parquet]", "data.absolute_winners=false",
        f"train.max_steps={rs.round_steps}", f"train.output_dir={round_dir(out, r) / 'train'}",
        f"train.seed={rs.seed * 1000 + r}", "train.resume=auto"]
    if rs.unpaired:
        ov.append("data.format=unpaired")
    if r > 0:
        prev = ckpt.find_checkpoint(round_dir(out, r - 1) / "train", "latest")
        ov.append(f"train.init_from={prev}")
    if r < rs.rounds - 1:
        ov.append("train.report=false")  # the report (on the bundled world) only after the last round
    return ov


def run(out: str | Path, rs: RoundsSettings, gen: "Settings", rt: "Runtime") -> dict[str, Any]:  # noqa: F821
    from ncp import generate
    from ncp.train import parse_args as train_args
    from ncp.train import train

    out = Path(out)
    if rs.rounds < 1 or rs.round_steps < 1:
        raise generate.GenerateError("--rounds and --round-steps must be at least 1")
    check_settings(out, rs, asdict(gen))
    rounds: list[dict[str, Any]] = []
    for r in range(rs.rounds):
        rd = round_dir(out, r)
        done = rd / "done.json"
        if done.is_file():
            rounds.append(json.loads(done.read_text()))
            logger.info("round %d: done before", r)
            continue
        rd.mkdir(parents=True, exist_ok=True)
        lora = round_dir(out, r - 1) / "train" / "lora" if r else None
        g = replace(gen, lora=str(lora) if lora else None, seed=gen.seed * 1000 + r)
        logger.info("round %d of %d: generate with %s", r + 1, rs.rounds, lora or "the base model")
        t0 = time.time()
        gsum = generate.run(rd / "generate", g, rt, pairs=rs.pairs, tie_margin=rs.tie_margin, unpaired=rs.unpaired)
        t_gen = time.time() - t0
        cfg_args = (["--config", rs.config] if rs.config else []) + train_overrides(out, rs, r, rd / "generate")
        logger.info("round %d of %d: train %d steps (%s)", r + 1, rs.rounds, rs.round_steps, " ".join(cfg_args))
        t0 = time.time()
        cfg, _ = train_args(cfg_args)
        if gen.model != "bundle" and cfg.model.path != gen.model:
            raise generate.GenerateError(f"--model {gen.model} samples, but the training config trains "
                                         f"model.path={cfg.model.path}: give model.path={gen.model} too")
        result = train(cfg)
        entry = {"round": r, "generate_s": t_gen, "train_s": time.time() - t0,
                 "samples_reward_mean": gsum["score"]["mean"], "samples_reward_std": gsum["score"]["std"],
                 "pairs": gsum.get("pairs", {}).get("kept"), "unpaired": gsum.get("unpaired"),
                 "images_per_s": gsum["sampling"].get("images_per_s"), "lora": result["lora"],
                 "train_metrics": {k: v for k, v in result["metrics"].items() if k.startswith(("train/", "loss"))}}
        if "report" in result:
            entry["report"] = result["report"]
        _write_json(done, entry)
        rounds.append(entry)
    final = out / "lora"
    tmp = out / ".tmp-lora"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(rounds[-1]["lora"], tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    summary = {"rounds": rounds, "lora": str(final),
               "wall_s": sum(e["generate_s"] + e["train_s"] for e in rounds)}
    _write_json(out / "summary.json", summary)
    print(f"{'round':>5} {'reward of its samples':>22} {'pairs':>6} {'generate s':>11} {'train s':>8}")
    for e in rounds:
        print(f"{e['round']:>5} {e['samples_reward_mean']:>22.4f} {e['pairs'] or '-':>6} {e['generate_s']:>11.1f} "
              f"{e['train_s']:>8.1f}")
    print(f"final LoRA: {final}")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ncp.generate import GenerateError, Runtime, Settings

    ap = argparse.ArgumentParser(prog="python -m ncp.onpolicy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d, g = RoundsSettings(), Settings()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=d.rounds)
    ap.add_argument("--round-steps", type=int, default=d.round_steps, help="optimizer steps a round")
    ap.add_argument("--seed", type=int, default=d.seed, help="seeds each round's samples and training")
    ap.add_argument("--config", default=None, help="the training recipe (ncp.train --config)")
    ap.add_argument("--model", default=g.model, help="the model to sample (and train: give model.path too)")
    ap.add_argument("--prompts", default=g.prompts, help="as ncp.generate --prompts (default: the bundle's)")
    ap.add_argument("--prompt-column", default=g.prompt_column)
    ap.add_argument("--exclude", default=None, help="prompts to keep out (the held-out prompts)")
    ap.add_argument("--max-prompts", type=int, default=0)
    ap.add_argument("--images-per-prompt", "-n", type=int, default=g.images_per_prompt)
    ap.add_argument("--scorers", default=g.scorers)
    ap.add_argument("--pairs", default=d.pairs)
    ap.add_argument("--tie-margin", type=float, default=d.tie_margin)
    ap.add_argument("--unpaired", default=None, help="quantile:Q or threshold:LO[:HI]: KTO labels, not pairs")
    ap.add_argument("--shard-prompts", type=int, default=g.shard_prompts, help="prompts per written sample shard")
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="images per sampler call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the sampler")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every round's ncp.train")
    a = ap.parse_intermixed_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = Settings(model=a.model, prompts=a.prompts, prompt_column=a.prompt_column, exclude=a.exclude,
                   max_prompts=a.max_prompts, images_per_prompt=a.images_per_prompt, seed=a.seed,
                   scheduler=a.scheduler, steps=a.steps, guidance=a.guidance,
                   dtype="fp16" if device == "cuda" else "fp32", scorers=a.scorers,
                   shard_prompts=a.shard_prompts)
    rs = RoundsSettings(rounds=a.rounds, round_steps=a.round_steps, seed=a.seed, config=a.config,
                        overrides=list(a.overrides), pairs=a.pairs, tie_margin=a.tie_margin, unpaired=a.unpaired)
    from ncp.config import ConfigError
    from ncp.data.batch import DataError
    from ncp.models import ModelLoadError
    from ncp.preempt import Preempted

    try:
        run(a.out, rs, gen, Runtime(batch_size=a.batch_size, device=device, threads=a.threads))
    except (GenerateError, ConfigError, DataError, ModelLoadError, OSError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"{stop}; run the same command again to go on", file=sys.stderr)
        return stop.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
