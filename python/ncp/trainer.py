"""The trainer's building blocks: the ``Trainer`` built once from the config, resuming, one micro-step, one
optimizer step, checkpoints and the final LoRA. ``ncp.train`` runs the loop over them."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ncp import checkpoint as ckpt
from ncp.config import Config, ConfigError, check_resume, to_dict
from ncp.criterion import Criterion
from ncp.data.batch import Batch, DataError, UnpairedBatch, vae_posterior
from ncp.data.options import LoaderOptions
from ncp.data.contract import PairSource
from ncp.data.sources import build_source
from ncp.flops import Throughput, training_throughput
from ncp.models import (DTYPES, Conditioning, Models, add_lora, attention_backend, compile_unet, encode_prompts,
                        family, load_lora_into, load_models, resolve_model_path, save_lora)
from ncp.objectives import OBJECTIVES
from ncp.optim import build_optimizer
from ncp.step import perceptual_dtype, preference_step, sample_noise
from ncp.timestep_scale import calibrated

logger = logging.getLogger("ncp.train")


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
    criterion: Criterion  # the objective as the step applies it (ncp.criterion)
    output_dir: Path
    step: int = 0
    throughput: Throughput | None = None  # perf/tflops, perf/mfu

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
    policy_dtype = DTYPES[precision] if precision != "no" else weight_dtype
    fam = family(models.kind)
    schedule = fam.training_schedule(models.scheduler, accelerator.device, cfg.model.sigma_sampling)
    criterion = Criterion.from_config(cfg.objective, schedule, models.kind, fam.tap_units(models.unet),
                                      encoder_dtype(cfg, policy_dtype, weight_dtype, accelerator.device))
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    throughput = training_throughput(
        models.unet, criterion, kind=models.kind, resolution=cfg.data.resolution,
        text_len=fam.text_tokens(models.tokenizers), lora_rank=cfg.lora.rank,
        latent_side=cfg.data.resolution // 2 ** (len(models.vae.config.block_out_channels) - 1),
        lora_targets=cfg.lora.target_modules, device=accelerator.device,
        precision=precision if precision != "no" else next(k for k, v in DTYPES.items() if v == weight_dtype),
        world_size=accelerator.num_processes, peak_tflops=cfg.logging.peak_tflops)
    tr = Trainer(cfg, accelerator, models, unet, params, optimizer, lr_scheduler, source, criterion, output_dir,
                 throughput=throughput)
    if criterion.needs_calibration:
        tr.criterion = calibrated_criterion(tr, build_source(options, resolve_model_path(cfg.model.path)))
    return tr


def encoder_dtype(cfg: Config, policy_dtype: torch.dtype, weight_dtype: torch.dtype,
                  device: torch.device) -> torch.dtype | None:
    """The perceptual encoder's dtype (``model.perceptual_precision``, ``ncp.step.perceptual_dtype``); sets
    the TF32 switches for an fp32 encoder on a GPU (its convs and matmuls are the only fp32 ones of the step)."""
    if OBJECTIVES[cfg.objective.name].space != "perceptual":
        return None
    try:
        dtype = perceptual_dtype(cfg.model.perceptual_precision, policy_dtype, weight_dtype, device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if dtype == torch.float32 and device.type == "cuda":
        tf32 = cfg.model.perceptual_precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return dtype


def criterion_for(tr: Trainer, name: str, **fields: Any) -> Criterion:
    """The criterion of objective ``name`` on this trainer's model and schedule: the config's objective settings
    with ``fields`` over them (the study benchmarks compare objectives on one setup)."""
    objective = dataclasses.replace(tr.cfg.objective, name=name, **fields)
    return Criterion.from_config(objective, tr.criterion.schedule, tr.models.kind,
                                 family(tr.models.kind).tap_units(tr.base), tr.criterion.encoder_dtype)


def calibrated_criterion(tr: Trainer, source: PairSource) -> Criterion:
    """The criterion with ``error_scale=log_t``'s weight table, from the first batch of a fresh source (epoch 0,
    this rank) and the training seed: the same table on every start and resume, and the training source is
    not touched."""
    gen = torch.Generator(tr.models.device).manual_seed(tr.cfg.train.seed)
    x0, cond = batch_inputs(tr, next(iter(source)), gen)
    with tr.accelerator.autocast():
        return calibrated(tr.criterion, tr.unet, tr.base, x0, cond, gen)


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


def init_from(tr: Trainer, folder: str) -> None:
    """Start from another run's checkpoint: its LoRA weights and optimizer moments (an exported ``lora/``
    folder: the weights alone); this run keeps its own step (0), data order and learning-rate schedule."""
    path = Path(folder)
    load_lora_into(tr.base, path)
    state_file = path / "trainer_state.pt"
    if state_file.is_file():
        ckpt.verify_checkpoint(path)
        mine = tr.optimizer.state_dict()  # this run's param groups (lr, schedule), the other run's moments
        mine["state"] = ckpt.read_trainer_state(state_file)["optimizer"]["state"]
        tr.optimizer.load_state_dict(mine)
        logger.info("train.init_from: LoRA and optimizer moments of %s", path)
    else:
        logger.info("train.init_from: LoRA of %s (no trainer_state.pt: fresh optimizer moments)", path)


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
    time_ids = family(models.kind).time_ids(batch.original_sizes, batch.crop_top_left, resolution)
    if time_ids is not None:
        cond.time_ids = time_ids.to(models.device, models.weight_dtype)
    return cond


def batch_inputs(tr: Trainer, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
    """A batch's latents (sampled from the VAE posterior with ``generator``) and its text condition."""
    return batch_latents(batch, tr.models, generator), batch_conditioning(batch, tr.models, tr.cfg.data.resolution)


def micro_step(tr: Trainer, batch: Batch, micro: int):
    """One micro-batch through the objective. A pair batch: B pairs, each pair's two images share ``t`` and
    the noise. An unpaired batch (binary feedback, per-image objectives only: KTO): N images, each with its
    own prompt, ``t`` and noise, and its label."""
    cfg, models = tr.cfg, tr.models
    gen = step_generator(cfg.train.seed, tr.step, micro, tr.accelerator.process_index, models.device)
    x0, cond = batch_inputs(tr, batch, gen)
    noise = sample_noise(len(batch), tuple(x0.shape[1:]), tr.criterion.schedule, gen, models.device)
    desirable = None
    if isinstance(batch, UnpairedBatch):
        if not tr.criterion.per_image:  # the config refuses this first (data.format); a source built by hand may not
            raise DataError(f"an unpaired batch (single images with binary labels) cannot train "
                            f"objective.name={cfg.objective.name}, which compares the two images of a pair")
        desirable = batch.desirable.to(models.device)
    if cfg.model.compile_mode == "reduce-overhead":  # CUDA graphs: the previous step's outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with tr.accelerator.autocast(), attention_backend(cfg.model.attention_backend):
        return preference_step(tr.criterion, tr.unet, tr.base, x0, cond, noise, desirable)


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
