"""``python -m ncp.train``: LoRA preference training (SFT, DPO, CPO, MaPO, KTO; latent or NCP space: docs/objectives.md).

Reads like a table of contents: parse the config, build the models, the data
and the optimizer, run the one loop every objective shares, clean up.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ncp import checkpoint as ckpt
from ncp import run_dir
from ncp.config import Config, ConfigError, check_overrides_apply, check_resume, help_text, load_config, to_dict
from ncp.data.batch import Batch, DataError, UnpairedBatch, vae_posterior
from ncp.data.options import LoaderOptions
from ncp.data.sources import PairSource, build_source, endless
from ncp.metrics import MetricsLogger
from ncp.flops import Throughput, training_throughput
from ncp.models import (DTYPES, Conditioning, ConcatenatedTaps, ModelLoadError, Models, TapWeights, add_lora,
                        attention_backend, compile_counters, compile_unet, encode_prompts, load_lora_into,
                        detect_kind, load_models, resolve_model_path, resolve_taps, save_lora, sdxl_time_ids)
from ncp.objectives import OBJECTIVES
from ncp.optim import build_optimizer
from ncp.preempt import Preempted, SignalStop
from ncp.schedule import NoiseSchedule
from ncp.step import perceptual_dtype, preference_step, sample_noise

logger = logging.getLogger("ncp.train")


# ---------------------------------------------------------------- building blocks


@dataclass
class Trainer:
    """Everything the loop needs, built once from the config."""

    cfg: Config
    accelerator: Any
    models: Models
    unet: torch.nn.Module  # the prepared (possibly DDP-wrapped) policy
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    source: PairSource
    schedule: NoiseSchedule
    taps: list
    tap_weights: TapWeights
    output_dir: Path
    step: int = 0
    throughput: Throughput | None = None  # perf/tflops, perf/mfu
    timestep_table: torch.Tensor | None = None  # error_scale=log_t: w(t) (ncp.timestep_scale); coef: 1/c_e(t)^2
    encoder_dtype: torch.dtype | None = None  # model.perceptual_precision (None: the policy's precision)

    @property
    def base(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet)


def frozen_weight_dtype(cfg: Config, on_gpu: bool) -> torch.dtype:
    """``model.weight_dtype``; auto: bf16 on a GPU, fp32 on the CPU, and fp32 for a perceptual objective whose
    reverse step and encoder run in fp32 (``model.perceptual_precision`` auto or fp32: autocast then casts the
    weights for the bf16 policy, ``ncp.step.perceptual_dtype``)."""
    if cfg.model.weight_dtype != "auto":
        return DTYPES[cfg.model.weight_dtype]
    fp32_encoder = (OBJECTIVES[cfg.objective.name].space == "perceptual"
                    and cfg.model.perceptual_precision in ("auto", "tf32", "fp32"))
    return torch.bfloat16 if on_gpu and not fp32_encoder else torch.float32


def setup(cfg: Config) -> Trainer:
    from accelerate import Accelerator

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but torch sees no CUDA device here (torch.cuda.is_available() is "
                          "false); use train.device=auto or cpu")
    device_name = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device_name.startswith("cuda")
    precision = cfg.train.mixed_precision if cfg.train.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision)
    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    weight_dtype = frozen_weight_dtype(cfg, on_gpu)
    models = load_models(cfg.model.path, cfg.model.kind, accelerator.device, weight_dtype, cfg.model.vae_path,
                         encoders_on_device=cfg.data.cache_dir is None)
    torch.manual_seed(cfg.train.seed)  # the LoRA init
    params = add_lora(models.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout,
                      cfg.lora.init_from)
    if cfg.model.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    if cfg.model.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    optimizer, lr_scheduler = build_optimizer(params, cfg.optim, accelerator.device)
    # The LR scheduler stays unprepared: accelerate's wrapper steps it once per process,
    # which would end the warmup num_processes times too early.
    unet, optimizer = accelerator.prepare(models.unet, optimizer)
    unet = compile_unet(unet, cfg.model.compile_unet, cfg.model.compile_mode)
    options = LoaderOptions.from_config(cfg.data, cfg.train.seed, accelerator.process_index,
                                        accelerator.num_processes)
    source = build_source(options, resolve_model_path(cfg.model.path))
    try:
        taps = resolve_taps(cfg.objective.taps, models.kind, len(models.unet.down_blocks))
    except ValueError as err:  # an unknown tap name: a config error, not a traceback
        raise ConfigError(str(err)) from err
    weights = tap_weights(cfg.objective, taps)
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    throughput = training_throughput(
        models.unet, models.kind, cfg.data.resolution, models.tokenizers[0].model_max_length, cfg.objective.name, taps,
        cfg.lora.rank, cfg.lora.target_modules, accelerator.device,
        precision if precision != "no" else next(k for k, v in DTYPES.items() if v == weight_dtype),
        accelerator.num_processes, cfg.logging.peak_tflops)
    tr = Trainer(cfg, accelerator, models, unet, params, optimizer, lr_scheduler, source,
                 NoiseSchedule.from_scheduler(models.scheduler, accelerator.device), taps, weights, output_dir,
                 throughput=throughput)
    policy_dtype = DTYPES[precision] if precision != "no" else weight_dtype
    if OBJECTIVES[cfg.objective.name].space == "perceptual":
        try:
            tr.encoder_dtype = perceptual_dtype(cfg.model.perceptual_precision, policy_dtype, weight_dtype,
                                                accelerator.device)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if tr.encoder_dtype == torch.float32 and on_gpu:  # the only fp32 convs and matmuls of the step
            tf32 = cfg.model.perceptual_precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    if cfg.objective.error_scale == "log_t":
        tr.timestep_table = calibrate_timesteps(tr, build_source(options, resolve_model_path(cfg.model.path)))
    elif cfg.objective.error_scale == "coef":
        tr.timestep_table = tr.schedule.noise_coefficient_table()
    return tr


def tap_weights(objective, taps: list) -> TapWeights:
    """The scale weights of the resolved ``taps``: the NCP authors' concatenation for ``objective.taps=authors``,
    else ``objective.tap_weights`` or equal weights."""
    if objective.taps == ["authors"]:
        return ConcatenatedTaps(normalize=objective.tap_normalize is not False)
    return objective.tap_weights or [1.0 / len(taps)] * len(taps)


def calibrate_timesteps(tr: Trainer, source: PairSource) -> torch.Tensor:
    """``error_scale=log_t``'s weight table, from the first batch of a fresh source (epoch 0, this rank) and
    the training seed: the same table on every start and resume, and the training source is not touched."""
    from ncp.timestep_scale import calibrate

    batch = next(iter(source))
    gen = torch.Generator(tr.models.device).manual_seed(tr.cfg.train.seed)
    x0 = batch_latents(batch, tr.models, gen)
    cond = batch_conditioning(batch, tr.models, tr.cfg.data.resolution)
    with tr.accelerator.autocast():
        return calibrate(tr.unet, tr.base, tr.schedule, OBJECTIVES[tr.cfg.objective.name], x0, cond, tr.taps,
                         tr.tap_weights, gen)


def resume(tr: Trainer, spec: str) -> None:
    folder = ckpt.find_checkpoint(tr.output_dir, spec)
    if folder is None:  # --resume auto with no checkpoint yet
        logger.info("--resume auto: no checkpoint in %s, starting at step 0", tr.output_dir)
        return
    check_resume(ckpt.read_json(folder / "config.json"), tr.cfg, folder)
    load_lora_into(tr.base, folder)
    state = ckpt.load_trainer_state(folder, tr.optimizer, tr.lr_scheduler)
    tr.source.resume(state["data"])
    tr.step = state["step"]
    logger.info("resumed from %s at step %d", folder, tr.step)


# ---------------------------------------------------------------- one step


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The randomness of a micro-step depends only on (seed, step, micro, rank): resumes reproduce it."""
    return torch.Generator(device).manual_seed(hash((seed, step, micro, rank)) & 0x7FFF_FFFF_FFFF_FFFF)


@torch.no_grad()
def batch_latents(batch: Batch, models: Models, generator: torch.Generator) -> torch.Tensor:
    """(2B, C, h, w) scaled latents, winners then losers (unpaired: (N, C, h, w), one per image), sampled from
    the VAE posterior."""
    vae = models.vae
    if batch.latents is not None:
        mean, logvar = batch.latents.to(models.device, torch.float32).unbind(1)
    else:
        mean, logvar = vae_posterior(vae, batch.pixels())  # uint8 -> [-1, 1] on the device
        mean, logvar = mean.to(models.device, torch.float32), logvar.to(models.device, torch.float32)
    sample = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((sample - shift) * vae.config.scaling_factor).to(models.weight_dtype)


def batch_conditioning(batch: Batch, models: Models, resolution: int) -> Conditioning:
    if batch.prompt_embeds is not None:
        cond = Conditioning(batch.prompt_embeds.to(models.device, models.weight_dtype),
                            None if batch.pooled_prompt_embeds is None
                            else batch.pooled_prompt_embeds.to(models.device, models.weight_dtype))
    else:
        cond = encode_prompts(models, batch.captions)
    if models.kind == "sdxl":
        cond.time_ids = sdxl_time_ids(batch.original_sizes, batch.crop_top_left, resolution).to(
            models.device, models.weight_dtype)
    return cond


def micro_step(tr: Trainer, batch: Batch, micro: int):
    """One micro-batch through the objective. A pair batch: B pairs, each pair's two images share ``t`` and
    the noise. An unpaired batch (binary feedback, per-image objectives only: KTO): N images, each with its
    own prompt, ``t`` and noise, and its label."""
    cfg, models = tr.cfg, tr.models
    gen = step_generator(cfg.train.seed, tr.step, micro, tr.accelerator.process_index, models.device)
    x0 = batch_latents(batch, models, gen)
    cond = batch_conditioning(batch, models, cfg.data.resolution)
    noise = sample_noise(len(batch), tuple(x0.shape[1:]), tr.schedule.num_timesteps, gen, models.device)
    objective = OBJECTIVES[cfg.objective.name]
    desirable = None
    if isinstance(batch, UnpairedBatch):
        if not objective.per_image:  # the config refuses this first (data.format); a source built by hand may not
            raise DataError(f"an unpaired batch (single images with binary labels) cannot train "
                            f"objective.name={cfg.objective.name}, which compares the two images of a pair")
        desirable = batch.desirable.to(models.device)
    if cfg.model.compile_mode == "reduce-overhead":  # CUDA graphs: the previous step's outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with tr.accelerator.autocast(), attention_backend(cfg.model.attention_backend):
        return preference_step(tr.unet, tr.base, tr.schedule, objective, objective.loss_kwargs(cfg.objective),
                               x0, cond, noise, tr.taps, tr.tap_weights, cfg.objective.error_scale,
                               timestep_table=tr.timestep_table, desirable=desirable,
                               encoder_dtype=tr.encoder_dtype)


def batches(source: PairSource) -> Iterator[Batch]:
    """Endless batches: epoch after epoch, continuing mid-epoch after a resume. The source owns the
    epoch counter (it moves to the next epoch as a pass ends); the trainer only iterates."""
    return endless(source)


def optimizer_step(tr: Trainer, data: Iterator[Batch]) -> dict[str, float] | None:
    """Accumulate grad_accum micro-steps, clip, step. Returns metrics, or None when the loss was not finite."""
    acc, accum = tr.accelerator, tr.cfg.train.grad_accum
    sums: dict[str, float] = {}
    pairs = 0
    for micro in range(accum):
        batch = next(data)
        out = micro_step(tr, batch, micro)
        finite = acc.reduce(torch.isfinite(out.loss).float().reshape(1), reduction="sum").item() == acc.num_processes
        if not finite:  # every rank skips the same step: no rank waits in an all-reduce
            tr.optimizer.zero_grad(set_to_none=True)
            return None
        with acc.no_sync(tr.unet) if micro < accum - 1 else contextlib.nullcontext():
            acc.backward(out.loss / accum)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
        pairs += len(batch)
    max_norm = tr.cfg.optim.max_grad_norm
    grad_norm = float(acc.clip_grad_norm_(tr.params, max_norm if max_norm > 0 else math.inf))
    if not math.isfinite(grad_norm):  # an overflowed gradient would make every weight NaN: skip, as a bad loss
        tr.optimizer.zero_grad(set_to_none=True)
        return None
    sums["train/grad_norm"] = grad_norm
    sums["train/lr"] = tr.lr_scheduler.get_last_lr()[0]
    tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    sums["perf/pairs"] = pairs * acc.num_processes
    sums["train/world_size"] = acc.num_processes
    return sums


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------- the loop


class DivergedError(FloatingPointError):
    """The LoRA weights are not finite: no checkpoint or LoRA of them is written."""


def require_finite(tr: Trainer) -> None:
    if not torch.stack([torch.isfinite(p).all() for p in tr.params]).all():
        good = ckpt.list_checkpoints(tr.output_dir)
        raise DivergedError(f"the LoRA weights are not finite after step {tr.step} (the run diverged): no "
                            f"checkpoint or LoRA of them written. Last checkpoint: "
                            f"{good[-1] if good else 'none'}; lower optim.lr or objective.beta and resume")


def write_checkpoint(tr: Trainer) -> None:
    acc = tr.accelerator
    require_finite(tr)
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.save_checkpoint(tr.output_dir, tr.step, lambda d: save_lora(tr.base, d, tr.models.kind),
                             tr.optimizer, tr.lr_scheduler, tr.source.state(), to_dict(tr.cfg),
                             tr.cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


def build_validator(tr: Trainer):
    """The validation grid of ``logging.validation_*`` (ncp.validation), drawn by the main process; None when off."""
    lc = tr.cfg.logging
    if not lc.validation_every or not tr.accelerator.is_main_process:
        return None
    from ncp.evaluate import read_prompts
    from ncp.validation import Validator
    from ncp.world.sampling import sampling_defaults

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
    data = batches(tr.source)
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


def export_lora(tr: Trainer) -> Path:
    """The final adapter in ``output_dir/lora`` (written beside, then renamed into place)."""
    final = tr.output_dir / "lora"
    require_finite(tr)
    if tr.accelerator.is_main_process:
        tmp = tr.output_dir / ".tmp-lora"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(tr.base, tmp, tr.models.kind)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    tr.accelerator.wait_for_everyone()
    return final


def train(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Train as configured; return the last step's metrics and the output paths. The run folder is held for
    the run (ncp.run_dir; ``overwrite`` clears a run in it); a signal stops it with a checkpoint (ncp.preempt)."""
    default_threads = torch.get_num_threads()  # before setup pins train.cpu_threads for training
    tr = setup(cfg)
    with run_dir.claim(tr.output_dir, cfg.train.resume, overwrite, tr.accelerator), SignalStop() as stop:
        if cfg.train.resume:
            resume(tr, cfg.train.resume)
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
    from ncp.world.report import after_training

    model_dir = Path(resolve_model_path(cfg.model.path))
    prompts = model_dir.parent / "data" / "heldout_prompts.txt"
    if not prompts.is_file():
        raise FileNotFoundError(f"train.report needs a world built by `python -m ncp.world build`: no {prompts}")
    return after_training(model_dir=str(model_dir), lora_dir=str(lora_dir), out_dir=str(output_dir),
                          metrics_path=str(output_dir / "metrics.jsonl"), prompts_path=str(prompts),
                          seed=cfg.train.seed)


# ---------------------------------------------------------------- CLI


RECIPES = Path(__file__).resolve().parent / "configs"  # default (the bundled world), sd15, sdxl
DEFAULT_CONFIG = RECIPES / "default.yaml"


def recipe(config: str | None, overrides: list[str]) -> tuple[Path, str]:
    """The YAML file a run starts from, and why. ``--config``: a file, or a shipped recipe by name (default,
    sd15, sdxl). Without it: the bundled world's default.yaml for the bundled model only; a run naming another
    model (``model.path=``) gets its family's recipe (``model.kind``, else ``ncp.models.detect_kind``)."""
    if config:
        named = RECIPES / f"{config}.yaml"
        return (named, f"--config {config}") if named.is_file() else (Path(config), f"--config {config}")
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    path = given.get("model.path", "bundle").strip()
    if path == "bundle":
        return DEFAULT_CONFIG, "the bundled model's recipe"
    kind = given.get("model.kind", "auto").strip()
    kind = detect_kind(path) if kind == "auto" else kind
    if kind not in ("sd15", "sdxl"):
        raise ConfigError(f"model.kind={kind}: no shipped recipe; give one with --config FILE")
    return RECIPES / f"{kind}.yaml", f"the {kind} recipe (model.path={path} is not the bundled model)"


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The config and whether ``--overwrite`` was given."""
    parser = argparse.ArgumentParser(
        prog="python -m ncp.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Align a text-to-image diffusion model with preference pairs (LoRA). With no arguments, "
                    "trains Diffusion-KTO on the small world bundled with ncp (python/ncp/configs/default.yaml says why).",
        epilog="options (set in the YAML file or as section.key=value; the defaults shown are the code's, and "
               "the recipe in force sets many of them: --print-config shows what a run gets):\n" + help_text())
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
