"""``python -m ncp.train``: LoRA preference training (SFT, DPO, CPO, MaPO, KTO; latent or NCP space: docs/objectives.md).

Reads like a table of contents: parse the config (a recipe and overrides), build the trainer
(``ncp.trainer``: models, data, criterion, optimizer), run the one loop every objective shares, export the
LoRA, report.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ncp import checkpoint as ckpt
from ncp import run_dir
from ncp.config import (DEFAULT_CONFIG, RECIPES, Config, ConfigError, check_overrides_apply, help_text,
                        load_config, load_recipes, to_dict)
from ncp.data.batch import DataError
from ncp.data.contract import endless
from ncp.metrics import MetricsLogger
from ncp.models import ModelLoadError, compile_counters, detect_kind, resolve_model_path
from ncp.paths import bundle_path
from ncp.preempt import Preempted, SignalStop
from ncp.report import after_training
from ncp.sampling import read_prompts, sampling_defaults
from ncp.trainer import (DivergedError, Trainer, export_lora, init_from, optimizer_step, peak_memory_mb, resume,
                         setup, write_checkpoint)
from ncp.validation import Validator

logger = logging.getLogger("ncp.train")

__all__ = ["DivergedError", "main", "parse_args", "recipe", "run_loop", "train"]


def build_validator(tr: Trainer):
    """The validation grid of ``logging.validation_*`` (ncp.validation), drawn by the main process; None when off."""
    lc = tr.cfg.logging
    if not lc.validation_every or not tr.accelerator.is_main_process:
        return None
    model_path = resolve_model_path(tr.cfg.model.path)
    steps, guidance = sampling_defaults(model_path)
    return Validator(tr.models, tr.base, model_path, read_prompts(lc.validation_prompts), lc.validation_seeds,
                     lc.validation_steps or steps, guidance if lc.validation_guidance is None else lc.validation_guidance,
                     tr.output_dir)


def run_loop(tr: Trainer, stop: SignalStop) -> dict[str, float]:
    """Train to ``train.max_steps``; on a signal (``stop``), checkpoint the step reached and raise
    :class:`Preempted`."""
    cfg, acc = tr.cfg, tr.accelerator
    log = MetricsLogger(tr.output_dir, cfg.train.max_steps, tr.step, acc.is_main_process,
                        cfg.logging.progress, cfg.logging.tensorboard)
    data = endless(tr.source)
    nonfinite_in_row, nonfinite_total, last = 0, 0, {}
    saved_step = tr.step  # of the newest checkpoint: the resumed one, or the start (nothing to save)
    validator = build_validator(tr)
    tr.unet.train()
    try:
        while tr.step < cfg.train.max_steps:
            signum = stop.requested(acc)
            if signum:
                if tr.step != saved_step:
                    write_checkpoint(tr)
                raise Preempted(signum, tr.step, ckpt.step_dir(tr.output_dir, tr.step) if tr.step else None,
                                tr.output_dir)
            start = time.perf_counter()
            metrics = optimizer_step(tr, data)
            if metrics is None:
                nonfinite_in_row += 1
                nonfinite_total += 1
                logger.warning("non-finite loss or gradient at step %d: skipped (%d in a row)", tr.step + 1,
                               nonfinite_in_row)
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{nonfinite_in_row} non-finite losses in a row (train.max_nonfinite); last good step "
                        f"{tr.step}. Lower optim.lr or objective.beta, or check the data.")
                continue
            nonfinite_in_row = 0
            tr.step += 1
            elapsed = time.perf_counter() - start
            metrics.update({"perf/step_s": elapsed, "perf/pairs_per_s": metrics.pop("perf/pairs") / elapsed,
                            "perf/peak_mem_mb": peak_memory_mb(acc.device), "train/nonfinite_skipped": nonfinite_total,
                            "data/skipped": tr.source.stats().get("skipped", 0)})
            if tr.throughput is not None:
                metrics.update(tr.throughput.metrics(metrics["perf/pairs_per_s"]))
            if cfg.model.compile_unet:
                metrics.update(compile_counters())  # constant after the first step: no recompilation
            if tr.step % cfg.logging.log_every == 0 or tr.step == cfg.train.max_steps:
                log.log(tr.step, metrics)
            log.advance(tr.step, metrics)
            if validator is not None and (tr.step % cfg.logging.validation_every == 0
                                          or tr.step == cfg.train.max_steps):
                log.image(tr.step, "validation", validator(tr.step))
            last = metrics
            every = cfg.train.checkpoint_every
            if (every and tr.step % every == 0) or tr.step == cfg.train.max_steps:
                write_checkpoint(tr)
                saved_step = tr.step
    finally:
        log.close()
    return last


def train(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Train as configured; return the last step's metrics and the output paths. The run folder is held for
    the run (ncp.run_dir; ``overwrite`` clears a run in it); a signal stops it with a checkpoint (ncp.preempt)."""
    default_threads = torch.get_num_threads()  # before setup pins train.cpu_threads for training
    tr = setup(cfg)
    with run_dir.claim(tr.output_dir, cfg.train.resume, overwrite, tr.accelerator), SignalStop() as stop:
        if cfg.train.resume:
            resume(tr, cfg.train.resume)
        if cfg.train.init_from and tr.step == 0:
            init_from(tr, cfg.train.init_from)
        last = run_loop(tr, stop)
        lora_dir = export_lora(tr)
        result = {"step": tr.step, "lora": str(lora_dir), "metrics": last, "output_dir": str(tr.output_dir)}
        if cfg.train.report and tr.accelerator.is_main_process:
            # train.cpu_threads leaves cores to the loader's decoders; the report after training has them all
            torch.set_num_threads(default_threads)
            result["report"] = world_report(cfg, lora_dir, tr.output_dir)
    tr.accelerator.end_training()
    return result


def world_report(cfg: Config, lora_dir: Path, output_dir: Path) -> dict:
    """Grid, curves and judge rewards of base vs aligned, for a world built by `python -m ncp.world build`
    (the world's held-out prompts sit in data/ beside its model folder)."""
    model_dir = Path(resolve_model_path(cfg.model.path))
    prompts = model_dir.parent / "data" / "heldout_prompts.txt"
    if not prompts.is_file():
        raise FileNotFoundError(f"train.report needs a world built by `python -m ncp.world build`: no {prompts}")
    return after_training(model_dir=str(model_dir), lora_dir=str(lora_dir), out_dir=str(output_dir),
                          metrics_path=str(output_dir / "metrics.jsonl"), prompts_path=str(prompts),
                          seed=cfg.train.seed)


# ---------------------------------------------------------------- CLI


def recipe(config: str | None, overrides: list[str]) -> tuple[Path, str]:
    """The YAML file a run starts from, and why. ``--config``: a file, or a shipped recipe by name (default,
    sd15, sdxl). Without it: the bundled world's default.yaml for the bundled model and for the model of an SD1.5
    world built by ``python -m ncp.world build --out DIR`` (``DIR/model``, with ``DIR/world.json`` beside it); a
    run naming another model (``model.path=``) gets its family's recipe (``model.kind``, else
    ``ncp.models.detect_kind``)."""
    if config:
        named = RECIPES / f"{config}.yaml"
        return (named, f"--config {config}") if named.is_file() else (Path(config), f"--config {config}")
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    path = given.get("model.path", "bundle").strip()
    if path == "bundle":
        return DEFAULT_CONFIG, "the bundled model's recipe"
    world = Path(path).parent / "world.json"  # a world built by python -m ncp.world: DIR/model beside DIR/world.json
    if world.is_file():
        try:
            family = json.loads(world.read_text()).get("family") or detect_kind(path)  # older worlds: no key
        except (ValueError, AttributeError) as err:
            raise ConfigError(f"{world}: not a world's JSON ({err}); give the recipe with --config") from err
        if family == detect_kind(str(bundle_path("model"))):  # a world of the bundled world's family
            return DEFAULT_CONFIG, f"the bundled world's recipe ({world}: a world built by python -m ncp.world)"
    kind = given.get("model.kind", "auto").strip()
    kind = detect_kind(path) if kind == "auto" else kind
    if not (RECIPES / f"{kind}.yaml").is_file():
        raise ConfigError(f"model.kind={kind}: no shipped recipe; give one with --config FILE")
    return RECIPES / f"{kind}.yaml", f"the {kind} recipe (model.path={path} is not the bundled model)"


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The config and whether ``--overwrite`` was given."""
    parser = argparse.ArgumentParser(
        prog="python -m ncp.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Align a text-to-image diffusion model with preference pairs (LoRA). With no arguments, "
                    "trains Diffusion-KTO on the small world bundled with ncp (python/ncp/configs/default.yaml says why).",
        epilog="options (set in the YAML file or as section.key=value; where the shipped recipes set one, each "
               "recipe's value is shown; --print-config shows what a run gets):\n" + help_text(load_recipes()))
    parser.add_argument("--config", help="YAML config, or a shipped recipe: default (the bundled world), sd15, "
                                          "sdxl (without it: default for the bundled model, else the model "
                                          "family's recipe)")
    parser.add_argument("--resume", help="'latest', 'auto' (latest if there is one, else start) or a checkpoint "
                                         "folder (same as train.resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="clear the run already in train.output_dir and start afresh (without it, a folder "
                             "holding a run is refused unless the run resumes it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)  # options may stand between the overrides
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    path, why = recipe(args.config, overrides)
    cfg = load_config(path, overrides)
    check_overrides_apply(cfg, overrides)
    logger.info("recipe: %s (%s); overrides: %s", path, why, " ".join(overrides) or "none")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        sys.exit(0)
    return cfg, args.overwrite


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train(*parse_args(argv))
    except (ConfigError, ModelLoadError, DataError, OSError, ImportError, FloatingPointError) as err:
        logger.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        logger.warning("%s", stop)
        print(stop, file=sys.stderr)
        return stop.code
    logger.info("done: %d steps, LoRA at %s", result["step"], result["lora"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
