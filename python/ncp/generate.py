"""``python -m ncp.generate``: sample a model on prompts, score every image, and write preference data.

    python -m ncp.generate --prompts prompts.txt --out gen/ [--model bundle] [--lora DIR] \\
        [--images-per-prompt 4] [--scorers judge] [--pairs best-worst] [--unpaired quantile:0.25]
    python -m ncp.train data.sources=[gen/pairs/*.parquet] data.absolute_winners=false

Each prompt gets ``--images-per-prompt`` images, each from its own seed (a hash of the run's seed, the
image's number and the prompt, written beside it), so an image depends only on (prompt, seed) and the
sampler settings, never on the batch it was drawn in. The main process samples; a second process scores,
JPEG-encodes and writes each shard of ``--shard-prompts`` prompts while the next batch samples. Every file
is written beside its final name and renamed into place, so a killed run resumes where it stopped: the
shards already written are skipped (``generate.json`` holds the settings, and a resumed run must match
them). Layout of ``--out``::

    generate.json                  the settings
    samples/samples-00000.parquet  one row per image: prompt, seed, JPEG, the reward and each scorer's score
    pairs/train-00000.parquet      Pick-a-Pic v2 pairs (--pairs), with the scores, seeds and model as columns
    unpaired/train-00000.parquet   caption, image, label (--unpaired; data.format=unpaired)
    summary.json                   images, images/s, pairs kept and their margin histogram

The pairs are remade from the samples on every run (``--pairs-only``: without sampling), so another rule
costs no sampling. Scorers: ``ncp.scoring`` (``judge``, ``pickscore:DIR``, ``hps:DIR``,
``fn:module:function``, each ``@weight``ed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("ncp.generate")

SAMPLES_SCHEMA_COLUMNS = ("prompt_index", "prompt", "k", "seed", "uid", "jpg", "score", "scores", "model")


class GenerateError(Exception):
    """Bad settings or inputs of ``ncp.generate``; the message names the file, option or setting."""


@dataclass
class Settings:
    """What decides the images and their scores: a resumed run must match every field (``generate.json``)."""

    model: str = "bundle"
    lora: str | None = None
    prompts: str = "bundle"
    prompt_column: str = "prompt"
    exclude: str | None = None
    max_prompts: int = 0
    images_per_prompt: int = 4
    seed: int = 0
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    dtype: str = "fp32"
    scorers: str = "judge"
    shard_prompts: int = 64
    jpeg_quality: int = 95

    def tag(self) -> str:
        """A short hash of what makes the images (not the scores): the uid prefix of every image."""
        make = {k: v for k, v in asdict(self).items() if k not in ("scorers", "shard_prompts", "jpeg_quality")}
        return hashlib.sha256(json.dumps(make, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class Runtime:
    """How the run goes, not what it makes: may differ on resume."""

    batch_size: int = 16
    device: str = "cpu"
    threads: int = 0
    scorer_threads: int = 1
    score: bool = True  # False: sample and drop (the benchmark's sampling-only baseline)


@dataclass
class Plan:
    prompts: list[str]
    shards: list[range] = field(default_factory=list)  # prompt indices of each shard


def image_seed(base: int, k: int, prompt: str) -> int:
    """The seed of image ``k`` of ``prompt``: different for every image and prompt, the same on every run."""
    digest = hashlib.sha256(f"{base}\x00{k}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


# ---------------------------------------------------------------- inputs


def resolve_prompts(s: Settings) -> list[str]:
    """The prompts to sample: the file's (``bundle``: the bundled world's training captions), each once, minus
    ``exclude``'s (``bundle``'s default: its held-out prompts), the first ``max_prompts``."""
    from ncp.paths import bundle_path
    from ncp.sampling import read_prompts

    if s.prompts == "bundle":
        source, exclude = bundle_path("data", "train-00000.parquet"), s.exclude or str(bundle_path("data", "heldout_prompts.txt"))
    else:
        source, exclude = Path(s.prompts), s.exclude
    if not Path(source).is_file():
        raise GenerateError(f"--prompts {source}: no such file")
    try:
        prompts = list(dict.fromkeys(read_prompts(source, s.prompt_column)))
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise GenerateError(f"--prompts {source}: {err}") from err
    if exclude:
        if not Path(exclude).is_file():
            raise GenerateError(f"--exclude {exclude}: no such file")
        keep_out = set(read_prompts(exclude))
        dropped = sum(p in keep_out for p in prompts)
        prompts = [p for p in prompts if p not in keep_out]
        logger.info("kept %d prompts of %s out (in %s)", dropped, source, exclude)
    if s.max_prompts:
        prompts = prompts[: s.max_prompts]
    if not prompts:
        raise GenerateError(f"--prompts {source}: no prompts left to sample")
    return prompts


def plan(s: Settings) -> Plan:
    prompts = resolve_prompts(s)
    n = s.shard_prompts
    return Plan(prompts, [range(i, min(i + n, len(prompts))) for i in range(0, len(prompts), n)])


def check_settings(out: Path, s: Settings, overwrite: bool, prompts: list[str]) -> None:
    """Write ``generate.json``, or check that the run already in ``out`` was made with the same settings and
    the same prompts (a prompt file edited between runs would shift every shard's prompts)."""
    path = out / "generate.json"
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    mine = asdict(s) | {"n_prompts": len(prompts), "prompts_sha256": digest}
    if path.is_file() and not overwrite:
        saved = json.loads(path.read_text())
        diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diffs:
            raise GenerateError(f"{out} holds a generation made with other settings ({'; '.join(diffs)}): give "
                                f"another --out, the same settings to resume it, or --overwrite to start afresh")
        return
    if overwrite:
        for sub in ("samples", "pairs", "unpaired"):
            for f in (out / sub).glob("*.parquet"):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(mine, indent=2) + "\n")
    os.replace(tmp, path)


def shard_path(out: Path, i: int) -> Path:
    return out / "samples" / f"samples-{i:05d}.parquet"


# ---------------------------------------------------------------- the scoring and writing process


def _writer_main(spec: str, quality: int, threads: int, inbox, outbox) -> None:
    """Score, encode and write shards as their batches arrive; report each written shard, or the error."""
    os.environ["TQDM_DISABLE"] = "1"  # the scorers' progress bars would garble the sampler's
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        from ncp.data.pairing import jpeg_bytes, write_parquet_atomic
        from ncp.scoring import make_reward

        reward = make_reward(spec)
        outbox.put(("ready", reward.name))
        open_shards: dict[int, dict[str, Any]] = {}
        while True:
            msg = inbox.get()
            if msg[0] == "end":
                break
            if msg[0] == "shard":
                _, idx, path, expected = msg
                open_shards[idx] = {"path": path, "expected": expected, "rows": [], "score_s": 0.0}
                continue
            _, idx, meta, images = msg
            sh = open_shards[idx]
            t0 = time.perf_counter()
            total, parts = reward.parts(list(images), meta["prompt"])
            for j in range(len(images)):
                sh["rows"].append({
                    "prompt_index": meta["prompt_index"][j], "prompt": meta["prompt"][j], "k": meta["k"][j],
                    "seed": meta["seed"][j], "uid": meta["uid"][j], "jpg": jpeg_bytes(images[j], quality),
                    "score": float(total[j]), "scores": json.dumps({n: float(v[j]) for n, v in parts.items()}),
                    "model": meta["model"]})
            sh["score_s"] += time.perf_counter() - t0
            if len(sh["rows"]) == sh["expected"]:
                import pyarrow as pa

                write_parquet_atomic(pa.Table.from_pylist(sh["rows"]), Path(sh["path"]))
                outbox.put(("written", idx, len(sh["rows"]), sh["score_s"]))
                del open_shards[idx]
    except BaseException:  # noqa: BLE001 - the main process reports it
        outbox.put(("error", traceback.format_exc()))


class Writer:
    """The scoring and writing process, fed batch by batch (a bounded queue: sampling never runs far ahead)."""

    def __init__(self, spec: str, quality: int, threads: int, depth: int = 4):
        ctx = mp.get_context("spawn")  # no fork of a process holding a model (and CUDA)
        self.inbox, self.outbox = ctx.Queue(maxsize=depth), ctx.Queue()
        self.proc = ctx.Process(target=_writer_main, args=(spec, quality, threads, self.inbox, self.outbox),
                                daemon=True, name="ncp-generate-writer")
        self.proc.start()
        self.written: list[tuple[int, int, float]] = []
        self.reward_name = self._expect("ready")[1]

    def _handle(self, msg) -> None:
        if msg[0] == "error":
            self.proc.join(5)
            raise GenerateError(f"scoring or writing failed:\n{msg[1]}")
        if msg[0] == "written":
            self.written.append(msg[1:])

    def _expect(self, kind: str, timeout: float = 600.0):
        while True:
            try:
                msg = self.outbox.get(timeout=timeout)
            except queue.Empty:
                raise GenerateError(f"the scoring process sent nothing for {timeout:.0f} s "
                                    f"(exit code {self.proc.exitcode})") from None
            self._handle(msg)
            if msg[0] == kind:
                return msg

    def poll(self) -> None:
        """Raise the writer's error, if it sent one; note written shards."""
        while True:
            try:
                self._handle(self.outbox.get_nowait())
            except queue.Empty:
                if not self.proc.is_alive() and self.proc.exitcode not in (0, None):
                    raise GenerateError(f"the scoring process died (exit code {self.proc.exitcode})")
                return

    def put(self, msg) -> None:
        while True:
            self.poll()
            try:
                self.inbox.put(msg, timeout=1.0)
                return
            except queue.Full:
                continue

    def finish(self, n_shards: int) -> None:
        self.put(("end",))
        while len(self.written) < n_shards:
            self._expect("written")
        self.proc.join(60)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# ---------------------------------------------------------------- sampling


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise GenerateError(f"--dtype {name}: expected fp32, fp16 or bf16") from None


def load_sampler(s: Settings, device: str):
    """The pipeline with the LoRA and scheduler, and its (steps, guidance): the given ones, else the model's."""
    from ncp.models import ModelLoadError, resolve_model_path
    from ncp.sampling import load_pipeline, sampling_defaults

    try:
        model_dir = resolve_model_path(s.model)
    except ModelLoadError as err:
        raise GenerateError(f"--model: {err}") from err
    if s.lora and not (Path(s.lora) / "pytorch_lora_weights.safetensors").is_file():
        raise GenerateError(f"--lora {s.lora}: no pytorch_lora_weights.safetensors in it")
    try:
        pipe = load_pipeline(model_dir, s.lora, scheduler=s.scheduler, device=device, dtype=torch_dtype(s.dtype))
    except ValueError as err:
        raise GenerateError(str(err)) from err
    steps, guidance = sampling_defaults(model_dir)
    return pipe, s.steps or steps, guidance if s.guidance is None else s.guidance


def sample_all(out: Path, s: Settings, rt: Runtime, p: Plan) -> dict[str, Any]:
    """Sample (and, with ``rt.score``, score and write) every shard not yet written; return the timings."""
    import torch
    from tqdm.auto import tqdm

    from ncp.sampling import generate

    todo = [i for i in range(len(p.shards)) if not (rt.score and shard_path(out, i).is_file())]
    n_images = sum(len(p.shards[i]) for i in todo) * s.images_per_prompt
    stats: dict[str, Any] = {"shards": len(p.shards), "shards_done_before": len(p.shards) - len(todo),
                             "images_sampled": n_images, "sampling_s": 0.0, "wall_s": 0.0}
    if not todo:
        return stats
    if rt.threads:
        torch.set_num_threads(rt.threads)
    t_wall = time.perf_counter()
    writer = Writer(s.scorers, s.jpeg_quality, rt.scorer_threads) if rt.score else None
    try:
        pipe, steps, guidance = load_sampler(s, rt.device)
        stats |= {"steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__}
        model = s.model + (f"+{s.lora}" if s.lora else "")
        tag = s.tag()
        t_wall = time.perf_counter()  # the model is loaded: images/s counts sampling, scoring and writing
        bar = tqdm(total=n_images, desc="generate", unit="img")
        for i in todo:
            items = [(pi, k) for pi in p.shards[i] for k in range(s.images_per_prompt)]
            if writer:
                writer.put(("shard", i, str(shard_path(out, i)), len(items)))
            for b in range(0, len(items), rt.batch_size):
                chunk = items[b: b + rt.batch_size]
                prompts = [p.prompts[pi] for pi, _ in chunk]
                seeds = [image_seed(s.seed, k, p.prompts[pi]) for pi, k in chunk]
                t0 = time.perf_counter()
                images = generate(pipe, prompts, seeds, steps, guidance, batch_size=len(chunk))
                stats["sampling_s"] += time.perf_counter() - t0
                if writer:
                    meta = {"prompt_index": [pi for pi, _ in chunk], "prompt": prompts, "k": [k for _, k in chunk],
                            "seed": seeds, "uid": [f"{tag}-p{pi:06d}-k{k}" for pi, k in chunk], "model": model}
                    writer.put(("batch", i, meta, np.stack(images)))
                bar.update(len(chunk))
                bar.set_postfix_str(f"{bar.n / (time.perf_counter() - t_wall):.2f} img/s")
        bar.close()
        if writer:
            writer.finish(len(todo))
            stats["scoring_s"] = sum(w[2] for w in writer.written)
            stats["reward"] = writer.reward_name
    finally:
        if writer:
            writer.kill()
    stats["wall_s"] = time.perf_counter() - t_wall
    stats["images_per_s"] = n_images / stats["wall_s"]
    stats["sampling_images_per_s"] = n_images / stats["sampling_s"] if stats["sampling_s"] else math.nan
    return stats


# ---------------------------------------------------------------- pairs


def read_shard(out: Path, i: int, columns: list[str]) -> Any:
    """The ``columns`` of sample shard ``i`` (a pyarrow Table), its rows in prompt order and, within a prompt, in
    image order (a stable sort: the order pairs and labels are made in). Only the columns asked for are read, so
    the scores alone of a shard cost no image bytes."""
    import pyarrow.parquet as pq

    path = shard_path(out, i)
    try:
        table = pq.read_table(path, columns=list(dict.fromkeys(["prompt_index", "k", *columns])))
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise GenerateError(f"cannot read {path}: {err}") from err
    return table.take(np.lexsort((table["k"].to_numpy(), table["prompt_index"].to_numpy())))


def read_samples(out: Path, i: int) -> list[list[Any]]:
    """Per prompt of shard ``i`` (in prompt order), the prompt's :class:`ncp.data.pairing.Sample` (in image order)."""
    from itertools import groupby

    from ncp.data.pairing import Sample

    rows = read_shard(out, i, list(SAMPLES_SCHEMA_COLUMNS)).to_pylist()
    return [[Sample(r["prompt"], r["seed"], r["uid"], r["jpg"], r["score"], json.loads(r["scores"]), r["model"])
             for r in group] for _, group in groupby(rows, key=lambda r: r["prompt_index"])]


def write_rows(path: Path, rows: list[dict], schema) -> None:
    """``rows`` at ``path`` (atomically); no file for no rows, and none left from an earlier run."""
    import pyarrow as pa

    from ncp.data.pairing import write_parquet_atomic

    if rows:
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        path.unlink(missing_ok=True)


def write_pairs(out: Path, s: Settings, n_shards: int, pair_rule, unpaired_rule) -> dict[str, Any]:
    """Pairs (and unpaired labels) of every shard's samples, one output file per shard; stale files removed.

    Shard by shard, so that a run's images are never all in memory at once: a pair rule sees one prompt's
    images and ``threshold`` labels one image, and a shard holds whole prompts. ``quantile`` alone ranks every
    image of the run, so its labels come first, from the score column of every shard (no image bytes read)."""
    from ncp.data.pairing import (GENERATED_PAIR_SCHEMA, UNPAIRED_SCHEMA, margin_histogram, pair_rows,
                                  select_unpaired, unpaired_rows)

    for sub, rule in (("pairs", pair_rule), ("unpaired", unpaired_rule)):
        for f in (out / sub).glob("train-*.parquet"):
            if rule is None or int(f.stem.split("-")[1]) >= n_shards:
                f.unlink()
    ranked = None  # quantile: the label of every image of the run, in shard, prompt and image order
    if unpaired_rule is not None and unpaired_rule.kind == "quantile":
        ranked = select_unpaired(np.concatenate([read_shard(out, i, ["score"])["score"].to_numpy()
                                                 for i in range(n_shards)]), unpaired_rule)
    n_prompts, n_images, scores, labels, margins, paired_prompts = 0, 0, [], [], [], 0
    for i in range(n_shards):
        groups = read_samples(out, i)
        flat = [x for g in groups for x in g]
        scores.append(np.array([x.score for x in flat], dtype=np.float64))
        if pair_rule is not None:
            rows, m = pair_rows(groups, pair_rule, placement_seed=s.seed * 100_003 + i)
            margins += m
            paired_prompts += len({r["caption"] for r in rows})
            write_rows(out / "pairs" / f"train-{i:05d}.parquet", rows, GENERATED_PAIR_SCHEMA)
        if unpaired_rule is not None:
            if ranked is None:  # threshold: an image's label is its own score's
                mine = select_unpaired(scores[-1], unpaired_rule)
            else:
                mine = ranked[n_images: n_images + len(flat)]
            labels.append(mine)
            write_rows(out / "unpaired" / f"train-{i:05d}.parquet", unpaired_rows(flat, mine), UNPAIRED_SCHEMA)
        n_prompts, n_images = n_prompts + len(groups), n_images + len(flat)
    summary: dict[str, Any] = {"prompts": n_prompts, "images": n_images}
    if pair_rule is not None:
        summary["pairs"] = {"rule": str(pair_rule), "tie_margin": pair_rule.tie_margin, "kept": len(margins),
                            "prompts_with_a_pair": paired_prompts,
                            "margin_mean": float(np.mean(margins)) if margins else math.nan,
                            "margin_histogram": margin_histogram(margins)}
    if unpaired_rule is not None:
        lab = np.concatenate(labels)
        summary["unpaired"] = {"rule": str(unpaired_rule), "desirable": int((lab == 1).sum()),
                               "undesirable": int((lab == 0).sum()), "dropped": int((lab < 0).sum())}
    all_scores = np.concatenate(scores)
    summary["score"] = {"mean": float(all_scores.mean()), "std": float(all_scores.std()),
                        "min": float(all_scores.min()), "max": float(all_scores.max())}
    return summary


# ---------------------------------------------------------------- entry point


def run(out: str | Path, s: Settings, rt: Runtime | None = None, pairs: str | None = "best-worst",
        tie_margin: float = 0.0, unpaired: str | None = None, overwrite: bool = False,
        pairs_only: bool = False) -> dict[str, Any]:
    """Sample, score and pair as ``python -m ncp.generate`` does; return the summary (also ``summary.json``)."""
    from ncp.data.pairing import PairRule, UnpairedRule, format_histogram

    rt = rt or Runtime()
    out = Path(out)
    for name, value in (("--images-per-prompt", s.images_per_prompt), ("--shard-prompts", s.shard_prompts),
                        ("--batch-size", rt.batch_size)):
        if value < 1:
            raise GenerateError(f"{name} {value}: must be at least 1")
    try:
        pair_rule = PairRule.parse(pairs, tie_margin) if pairs and pairs != "none" else None
        unpaired_rule = UnpairedRule.parse(unpaired) if unpaired else None
    except ValueError as err:
        raise GenerateError(str(err)) from err
    if pair_rule and s.images_per_prompt < 2:
        raise GenerateError("--pairs needs at least 2 images per prompt (--images-per-prompt)")
    from ncp.scoring import check_reward

    try:
        if not pairs_only:  # a bad spec fails before any sampling; the scoring process alone loads the scorers
            check_reward(s.scorers)
    except ValueError as err:
        raise GenerateError(f"--scorers {s.scorers}: {err}") from err
    p = plan(s)
    if not rt.score:
        return sample_all(out, s, rt, p)
    check_settings(out, s, overwrite and not pairs_only, p.prompts)
    stats = {} if pairs_only else sample_all(out, s, rt, p)
    missing = [i for i in range(len(p.shards)) if not shard_path(out, i).is_file()]
    if missing:
        raise GenerateError(f"{out}: {len(missing)} of {len(p.shards)} sample shards are missing (first: "
                            f"{shard_path(out, missing[0])}); run without --pairs-only to sample them")
    summary = {"settings": asdict(s), "sampling": stats} | write_pairs(out, s, len(p.shards), pair_rule, unpaired_rule)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    if stats.get("images_sampled"):
        print(f"sampled {stats['images_sampled']} images in {stats['wall_s']:.1f} s: {stats['images_per_s']:.2f} "
              f"images/s (sampling alone {stats['sampling_images_per_s']:.2f}/s; scoring {stats.get('scoring_s', 0):.1f} s "
              f"in the other process)")
    sc = summary["score"]
    print(f"{summary['images']} images of {summary['prompts']} prompts; reward {sc['mean']:.4f} +- {sc['std']:.4f}")
    if "pairs" in summary:
        pr = summary["pairs"]
        print(f"pairs ({pr['rule']}, ties <= {pr['tie_margin']:g} dropped): {pr['kept']} kept, mean margin "
              f"{pr['margin_mean']:.4f}; margins:\n{format_histogram(pr['margin_histogram'])}")
        print(f"train on them: python -m ncp.train 'data.sources=[{out / 'pairs'}/*.parquet]' data.absolute_winners=false")
    if "unpaired" in summary:
        u = summary["unpaired"]
        print(f"unpaired ({u['rule']}): {u['desirable']} desirable, {u['undesirable']} undesirable, {u['dropped']} "
              f"dropped; train: python -m ncp.train 'data.sources=[{out / 'unpaired'}/*.parquet]' data.format=unpaired "
              f"data.absolute_winners=false objective.name=kto")
    return summary


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings, Runtime]:
    d, r = Settings(), Runtime()
    ap = argparse.ArgumentParser(prog="python -m ncp.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (resumed when it holds a run of the same settings)")
    ap.add_argument("--model", default=d.model, help="diffusers pipeline folder, or 'bundle' (default)")
    ap.add_argument("--lora", default=None, help="a LoRA folder (a run's lora/) to sample the policy with")
    ap.add_argument("--prompts", default=d.prompts,
                    help=".txt (one a line), .tsv/.csv (PartiPrompts: --prompt-column Prompt) or .parquet (a "
                         "column; 'caption' by default); 'bundle': the bundled world's training captions")
    ap.add_argument("--prompt-column", default=d.prompt_column)
    ap.add_argument("--exclude", default=None, help="prompts to keep out (a prompt file: the held-out prompts); "
                                                    "--prompts bundle keeps the bundle's held-out prompts out")
    ap.add_argument("--max-prompts", type=int, default=0, help="the first N prompts only (0: all)")
    ap.add_argument("--images-per-prompt", "-n", type=int, default=d.images_per_prompt)
    ap.add_argument("--seed", type=int, default=d.seed, help="the run's seed (each image's seed derives from it)")
    ap.add_argument("--scheduler", default=None, help="a diffusers scheduler class (default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the world's, else 20)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the world's, else 3.0)")
    ap.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--scorers", default=d.scorers,
                    help="comma list, each @weight'ed: judge, judge.alignment, judge.quality, pickscore:DIR, "
                         "hps:DIR, fn:module:function (their weighted sum is the reward)")
    ap.add_argument("--pairs", default="best-worst", help="best-worst, margin:M, top-bottom:K, or none")
    ap.add_argument("--tie-margin", type=float, default=0.0, help="pairs whose margin is at most this are dropped")
    ap.add_argument("--unpaired", default=None, help="also write unpaired KTO labels: quantile:Q or threshold:LO[:HI]")
    ap.add_argument("--shard-prompts", type=int, default=d.shard_prompts, help="prompts per written shard")
    ap.add_argument("--batch-size", type=int, default=r.batch_size, help="images per sampler call")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the sampler (0: torch's default)")
    ap.add_argument("--scorer-threads", type=int, default=1, help="torch threads of the scoring process")
    ap.add_argument("--pairs-only", action="store_true", help="remake the pairs from the samples; no sampling")
    ap.add_argument("--overwrite", action="store_true", help="clear a run of other settings in --out")
    a = ap.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = Settings(model=a.model, lora=a.lora, prompts=a.prompts, prompt_column=a.prompt_column, exclude=a.exclude,
                 max_prompts=a.max_prompts, images_per_prompt=a.images_per_prompt, seed=a.seed,
                 scheduler=a.scheduler, steps=a.steps, guidance=a.guidance,
                 dtype=a.dtype or ("fp16" if device.startswith("cuda") else "fp32"), scorers=a.scorers,
                 shard_prompts=a.shard_prompts)
    rt = Runtime(batch_size=a.batch_size, device=device, threads=a.threads, scorer_threads=a.scorer_threads)
    return a, s, rt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    a, s, rt = parse_args(argv)
    try:
        run(a.out, s, rt, pairs=a.pairs, tie_margin=a.tie_margin, unpaired=a.unpaired, overwrite=a.overwrite,
            pairs_only=a.pairs_only)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
