"""Step benchmark: one training step of ncp's DPO and NCP-DPO against the baseline Diffusion-DPO step.

Full-size SD1.5 and SDXL U-Nets are built from their published configs (written
out below, random weights: weights do not change speed), with text conditioning
as random tensors of the right shapes. Three variants per model:

- ``baseline``: the Diffusion-DPO step as its reference implementation
  (SalesforceAIResearch/DiffusionDPO ``train.py``) does it: the whole U-Net
  trained in fp32 under fp16 autocast with a GradScaler, a second full U-Net
  copy in fp16 as the frozen reference, the loss in latent space; AdamW for
  SD1.5, Adafactor + gradient checkpointing + the reference U-Net offloaded to
  the CPU (``accelerate.cpu_offload``) for SDXL, as that script does. (It uses
  xformers; here both sides use PyTorch SDPA.)
- ``dpo``: ncp's latent-space DPO, ``ncp.step.preference_step``.
- ``ncp-dpo``: ncp's NCP-DPO, ``ncp.step.preference_step``.
- ``mapo``, ``ncp-mapo`` (only when named in ``--variants``): ncp's MaPO, which has no reference pass;
  they join the same worker as ``dpo`` / ``ncp-dpo``, alternating steps with them.
ncp's variants: LoRA rank 64 on to_q/to_k/to_v/to_out.0 (``ncp.models.add_lora``),
``ncp.optim.build_optimizer`` (8-bit AdamW on CUDA, torch AdamW on CPU), frozen
weights and autocast in bf16; the reference is the same U-Net with its adapters
disabled.

Each model is built in its own subprocess (a clean peak-memory reading: CUDA
``max_memory_allocated`` per step, CPU the worker's peak RSS): first ncp's DPO and
NCP-DPO together, on one LoRA U-Net, their steps alternating (ABBA) at the batch
that fits NCP-DPO, so that their step-time ratio holds even on a machine whose
speed drifts; then the baseline; then (CUDA, automatic batch) ncp's DPO alone at
its own largest batch. Timed steps follow warm-up steps; the median is reported.
On CUDA the batch is the largest power of two that fits (``--batch auto``).

    python benchmarks/step.py                          # CUDA if present, else a reduced CPU run
    python benchmarks/step.py --device cpu --model sd15 --resolution 128 --batch 1 --steps 3
    python benchmarks/step.py --quick                  # smoke test: tiny resolution, 1+2 steps

Writes benchmarks/results/step.json (and $OUT/step.json when $OUT is set) and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from goals import goal  # noqa: E402  (benchmarks/goals.yaml)

# ---------------------------------------------------------------- the published U-Net configs

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (defaults of UNet2DConditionModel omitted)
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (defaults omitted)
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 (pooled text) + 6 time ids x 256
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}

# Both models' scheduler/scheduler_config.json (the DDPM training schedule)
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1,
}

MODELS: dict[str, dict[str, Any]] = {
    "sd15": dict(unet=SD15_UNET, resolution=512, text_len=77, text_dim=768, pooled_dim=None,
                 params=859.5e6, max_batch=16),
    "sdxl": dict(unet=SDXL_UNET, resolution=1024, text_len=77, text_dim=2048, pooled_dim=1280,
                 params=2567.5e6, max_batch=8),
}
VARIANTS = ("baseline", "dpo", "ncp-dpo")
NCP_VARIANTS = ("dpo", "ncp-dpo", "mapo", "ncp-mapo")  # ncp objectives this benchmark can time
LORA_RANK = 64
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
BETA = 5000.0


# ---------------------------------------------------------------- the worker: one (model, variant)


def _build_unet(config: dict[str, Any], device, dtype):
    """A randomly initialised U-Net created directly on ``device`` in ``dtype`` (no fp32 detour)."""
    import torch
    from diffusers import UNet2DConditionModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(dict(config))
    finally:
        torch.set_default_dtype(previous)
    return unet


def _inputs(spec: dict[str, Any], batch: int, dtype, device) -> dict[str, Any]:
    """Random latents (2B: winners then losers) and a random text condition for B prompts."""
    import torch

    m = MODELS[spec["model"]]
    h = spec["resolution"] // 8
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn((2 * batch, 4, h, h), generator=gen, device=device).to(dtype)
    hidden = torch.randn((batch, m["text_len"], m["text_dim"]), generator=gen, device=device).to(dtype)
    pooled = time_ids = None
    if m["pooled_dim"]:
        pooled = torch.randn((batch, m["pooled_dim"]), generator=gen, device=device).to(dtype)
        r = spec["resolution"]  # original size, crop (0, 0), target size
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=dtype).repeat(batch, 1)
    return dict(x0=x0, hidden=hidden, pooled=pooled, time_ids=time_ids)


class BaselineStep:
    """Diffusion-DPO's training step as its reference train.py does it (see the module docstring)."""

    def __init__(self, spec: dict[str, Any], device):
        import torch
        from diffusers import DDPMScheduler

        self.torch, self.spec, self.device = torch, spec, device
        on_cuda = device.type == "cuda"
        # The reference runs fp16 autocast + GradScaler; fp16 is not a CPU dtype worth timing, so CPU uses bf16.
        self.half = torch.float16 if on_cuda else torch.bfloat16
        unet_config = spec.get("unet_config") or MODELS[spec["model"]]["unet"]  # e2e.py: its own (reduced) config
        self.unet = _build_unet(unet_config, device, torch.float32)  # trained in full
        self.unet.train()
        if spec["checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.offload = spec["offload_ref"]
        self.ref = _build_unet(unet_config, device, self.half)  # the full frozen copy
        self.ref.requires_grad_(False)
        if self.offload:  # train.py: ref_unet = accelerate.cpu_offload(ref_unet) for SDXL
            import accelerate

            self.ref = accelerate.cpu_offload(self.ref.to("cpu"), execution_device=device)
        self.adafactor = spec["model"] == "sdxl"  # train.py: "Using Adafactor ... because you're using SDXL"
        if self.adafactor:
            from transformers.optimization import Adafactor

            self.opt = Adafactor(self.unet.parameters(), lr=5.12e-6, weight_decay=1e-2, clip_threshold=1.0,
                                 scale_parameter=False, relative_step=False)
        else:
            self.opt = torch.optim.AdamW(self.unet.parameters(), lr=5.12e-6, betas=(0.9, 0.999),
                                         weight_decay=1e-2, eps=1e-8)
        # fp16 loss scaling as accelerate does it; a lower initial scale than the default 2**16 reaches the steady
        # state (no skipped optimizer steps) within the warm-up on random weights. Skips are counted and reported.
        fp16 = self.half == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if fp16 else None
        self.skipped = 0
        self.scheduler = DDPMScheduler.from_config(SCHEDULER)
        self.trainable = sum(p.numel() for p in self.unet.parameters())
        self.optimizer_name = type(self.opt).__name__

    def set_batch(self, batch: int) -> None:
        self.batch = batch
        self.inp = _inputs(self.spec, batch, self.half, self.device)

    def step(self, variant: str = "baseline", inp: dict[str, Any] | None = None) -> float:
        """One step on the set batch's inputs, or on ``inp`` (e2e.py: latents and text of a loaded batch)."""
        inp = inp if inp is not None else self.inp
        torch, b = self.torch, inp["x0"].shape[0] // 2
        latents = inp["x0"]  # (2B, 4, h, w): winners then losers, as the VAE returns them (half precision)
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)  # shared by the images of a pair
        t = torch.randint(0, 1000, (b,), device=self.device).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, t)
        ehs = inp["hidden"].repeat(2, 1, 1)
        added = None if inp["pooled"] is None else {"text_embeds": inp["pooled"].repeat(2, 1),
                                                     "time_ids": inp["time_ids"].repeat(2, 1)}
        with torch.autocast(self.device.type, dtype=self.half):  # accelerate wraps the prepared U-Net's forward
            pred = self.unet(noisy, t, ehs, added_cond_kwargs=added).sample
        model_losses = (pred - noise).pow(2).mean(dim=[1, 2, 3])
        model_diff = model_losses[:b] - model_losses[b:]
        with torch.no_grad():
            ref_pred = self.ref(noisy, t, ehs, added_cond_kwargs=added).sample.detach()
            ref_losses = (ref_pred - noise).pow(2).mean(dim=[1, 2, 3])
            ref_diff = ref_losses[:b] - ref_losses[b:]
        loss = -torch.nn.functional.logsigmoid(-0.5 * BETA * (model_diff - ref_diff)).mean()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if not self.adafactor:  # Adafactor clips itself
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.skipped += self.scaler.get_scale() < scale  # an overflow: this optimizer step was skipped
        else:
            loss.backward()
            if not self.adafactor:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reset(self) -> None:
        """After an out-of-memory step: drop the gradients and the scaler's half-finished step."""
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler = self.torch.amp.GradScaler("cuda", init_scale=2.0**10)


class NcpStep:
    """ncp's step: LoRA policy, ``preference_step`` with the dpo or ncp-dpo objective, build_optimizer."""

    def __init__(self, spec: dict[str, Any], device):
        import torch
        from diffusers import DDPMScheduler

        from ncp.config import ObjectiveConfig, OptimConfig
        from ncp.criterion import Criterion
        from ncp.models import add_lora
        from ncp.schedule import NoiseSchedule

        self.torch, self.spec, self.device = torch, spec, device
        self.dtype = torch.bfloat16  # frozen weights and autocast (ncp's default on GPU; the configs' choice)
        self.unet = _build_unet(MODELS[spec["model"]]["unet"], device, self.dtype)
        self.unet.requires_grad_(False)
        torch.manual_seed(0)
        self.params = add_lora(self.unet, LORA_RANK, float(LORA_RANK), LORA_TARGETS, 0.0)
        if spec["checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.opt, self.lr_schedule = _build_optimizer(self.params, OptimConfig(lr=5.12e-6, warmup_steps=1), device)
        self.optimizer_source = _OPTIMIZER_SOURCE
        self.schedule = NoiseSchedule.from_scheduler(DDPMScheduler.from_config(SCHEDULER), device)
        self.criteria = {name: Criterion.from_config(ObjectiveConfig(name=name, beta=BETA, beta_cpo=BETA), self.schedule,
                                                     spec["model"], len(self.unet.down_blocks))
                         for name in NCP_VARIANTS}  # taps auto: mid (SD1.5), the last down block (SDXL)
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer_name = type(self.opt).__module__.split(".")[0] + "." + type(self.opt).__name__
        self.gen = torch.Generator(device).manual_seed(0)
        self.policy = self.unet  # the module the policy pass calls (a wrapper under compile=full)
        self.levers: dict[str, Any] = {}
        self.compiled: tuple | None = None
        self.weight_dtype = self.dtype  # the frozen weights (fp32 when the perceptual path runs fp32)
        self.encoder_dtype = None  # model.perceptual_precision of the ncp-* variants (None: the policy's)

    def set_levers(self, levers: dict[str, Any]) -> None:
        """Apply one configuration of the speed levers (``model.*`` of ncp's config) to the built U-Net:
        channels_last, dtype of the frozen weights and autocast (bf16 / fp16), SDPA backend, compile_unet
        and compile_mode. Compilation cannot be undone: sweeps put the compiled configurations last."""
        torch = self.torch
        from ncp.models import compile_unet

        fmt = torch.channels_last if levers.get("channels_last") else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[levers.get("dtype", "bf16")]
        # model.perceptual_precision: fp32 / tf32 keep the frozen weights fp32 (autocast casts them for the
        # policy) and run the reverse step and encoder in fp32; fp16 the encoder under fp16 autocast
        perceptual = levers.get("perceptual", "same")
        weights = torch.float32 if perceptual in ("fp32", "tf32") else dtype
        if weights != self.weight_dtype:
            for p in self.unet.parameters():
                if not p.requires_grad:  # the frozen weights; the LoRA weights stay fp32
                    p.data = p.data.to(weights)
        self.dtype, self.weight_dtype = dtype, weights
        self.encoder_dtype = {"same": None, "fp16": torch.float16}.get(perceptual, torch.float32)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = perceptual != "fp32"
        how, mode = levers.get("compile", False), levers.get("compile_mode", "default")
        if how and (how, mode) != self.compiled:
            if self.compiled is not None:
                torch._dynamo.reset()  # another mode: compile afresh
            self.policy = compile_unet(self.unet, how, mode)
            self.compiled = (how, mode)
        self.levers = dict(levers)

    def set_batch(self, batch: int) -> None:
        from ncp.models import Conditioning

        self.batch = batch
        self.inp = _inputs(self.spec, batch, self.weight_dtype, self.device)
        self.cond = Conditioning(self.inp["hidden"], self.inp["pooled"], self.inp["time_ids"])

    def step(self, variant: str) -> float:
        from ncp.step import preference_step, sample_noise

        torch = self.torch
        x0 = self.inp["x0"]
        noise = sample_noise(self.batch, tuple(x0.shape[1:]), self.schedule.num_timesteps, self.gen, self.device)
        from ncp.models import attention_backend

        if self.levers.get("compile_mode") == "reduce-overhead":  # CUDA graphs: a new step may overwrite outputs
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=self.dtype), attention_backend(self.levers.get("attention", "auto")):
            criterion = self.criteria[variant]
            if criterion.perceptual:
                criterion = dataclasses.replace(criterion, encoder_dtype=self.encoder_dtype)
            out = preference_step(criterion, self.policy, self.unet, x0, self.cond, noise)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.lr_schedule.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def reset(self) -> None:
        self.opt.zero_grad(set_to_none=True)


_OPTIMIZER_SOURCE = "ncp.optim.build_optimizer"


def _build_optimizer(params, cfg, device):
    """``ncp.optim.build_optimizer`` (8-bit AdamW on CUDA); without bitsandbytes, torch AdamW, and the result
    says so."""
    global _OPTIMIZER_SOURCE
    from ncp.optim import build_optimizer

    try:
        return build_optimizer(params, cfg, device)
    except ImportError as err:  # bitsandbytes missing
        _OPTIMIZER_SOURCE = f"ncp.optim.build_optimizer with use_8bit=off ({err})"
        return build_optimizer(params, dataclasses.replace(cfg, use_8bit="off"), device)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _candidates(spec: dict[str, Any]) -> list[int]:
    if spec["batch"] != "auto":
        return [int(spec["batch"])]
    top = int(spec.get("max_batch") or MODELS[spec["model"]]["max_batch"])
    out = []
    while top >= 1:
        out.append(top)
        top //= 2
    return out


def _time_steps(runner, variants: list[str], spec: dict[str, Any], device) -> dict[str, dict[str, Any]]:
    """Warm-up then timed steps, the variants alternating step by step (ABBA order) so that a drift of the
    machine's speed hits them alike. Raises on out-of-memory."""
    import torch

    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks = dict.fromkeys(variants, 0.0)
    finite = dict.fromkeys(variants, True)
    for i in range(spec["warmup"] + spec["steps"]):
        for variant in (variants if i % 2 == 0 else variants[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            loss = runner.step(variant)
            _sync(device)
            if i >= spec["warmup"]:
                times[variant].append(time.perf_counter() - start)
            peaks[variant] = max(peaks[variant], _peak_mb(device))
            finite[variant] &= _finite(loss)
    return {v: {"step_s": statistics.median(times[v]) if times[v] else None, "step_s_all": times[v], "peak_mem_mb": peaks[v],
                "loss_finite": finite[v]} for v in variants}


def run_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Build one model (the baseline's two U-Nets, or ncp's LoRA U-Net shared by dpo and ncp-dpo), find the
    batch (the largest that fits, or the given one), warm up and time each of its variants."""
    import torch

    import ncp.ops

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    variants = spec["variants"]
    t0 = time.perf_counter()
    runner = BaselineStep(spec, device) if variants == ["baseline"] else NcpStep(spec, device)
    build_s = time.perf_counter() - t0
    resident_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
    tried: list[dict[str, Any]] = []
    chosen, timed = None, {}
    for batch in _candidates(spec):
        runner.set_batch(batch)
        try:
            timed = _time_steps(runner, variants, spec, device)
            chosen = batch
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            tried.append({"batch": batch, "result": "out of memory"})
        if chosen is not None:
            break
        runner.reset()  # outside the except block: the traceback no longer holds the step's tensors
        runner.inp = None
        _free(device)
    common: dict[str, Any] = {
        **{k: spec[k] for k in ("model", "device", "resolution", "checkpointing", "offload_ref")},
        "latent": spec["resolution"] // 8, "batch": chosen, "tried": tried, "build_s": round(build_s, 2),
        "trainable_params": runner.trainable, "optimizer": runner.optimizer_name,
        "optimizer_source": getattr(runner, "optimizer_source", "as DiffusionDPO's train.py (BaselineStep)"),
        "frozen_dtype": str(getattr(runner, "half", getattr(runner, "dtype", None))).replace("torch.", ""),
        "ops": "fused" if device.type in ncp.ops.FUSED_DEVICES else "reference",
        "resident_mb": round(resident_mb, 1), "threads": torch.get_num_threads(),
        "optimizer_steps_skipped_fp16": getattr(runner, "skipped", 0),
        "measured_with": variants,
        "peak_mem_kind": "max_memory_allocated per step" if device.type == "cuda" else
                         "peak RSS of the worker process" + (" (shared by its variants)" if len(variants) > 1 else ""),
    }
    rows = []
    for variant in variants:
        row = dict(common, variant=variant)
        if chosen is None:
            row["error"] = "no batch size fits"
        else:
            t = timed[variant]
            row.update({"steps_timed": len(t["step_s_all"]), "warmup": spec["warmup"],
                        "step_s": round(t["step_s"], 4), "step_s_all": [round(x, 4) for x in t["step_s_all"]],
                        "pairs_per_s": round(chosen / t["step_s"], 4), "peak_mem_mb": round(t["peak_mem_mb"], 1),
                        "loss_finite": t["loss_finite"]})
        rows.append(row)
    if spec.get("profile") and chosen is not None:
        top = _profile(runner, variants, device)
        for row in rows:
            row["profile_top"] = top[row["variant"]]
    if spec["role"] == "sweep":
        for row in rows:  # the sweep's reference configuration
            row.update(role="sweep", levers={}, levers_name="eager")
    if spec.get("sweep") and chosen is not None:
        print("RESULT " + json.dumps(rows), flush=True)  # kept should a later configuration hang
        rows.extend(_sweep(runner, variants, spec, device, common, lambda done: print(
            "RESULT " + json.dumps(rows + done), flush=True)))
    return rows


def _sweep(runner, variants: list[str], spec: dict[str, Any], device, common: dict[str, Any],
           report) -> list[dict[str, Any]]:
    """The speed levers, one configuration after another on the same built U-Net and batch (compiled ones
    last). A configuration that fails (a kernel the device lacks, out of memory) is recorded and skipped."""
    import torch

    from ncp.models import compile_counters

    rows = []
    for levers in spec["sweep"]:
        name = _levers_name(levers)
        print(f"   sweep {name} ...", file=sys.stderr, flush=True)
        base = dict(common, role="sweep", levers=levers, levers_name=name)
        try:
            t0 = time.perf_counter()
            runner.set_levers(levers)
            runner.set_batch(common["batch"])
            # compiled configurations: the first steps compile every variant (policy, reference, encoder)
            timed_spec = dict(spec, warmup=spec["warmup"] + (1 if levers.get("compile") else 0))
            graphs_before = compile_counters()["compile/graphs"]
            timed = _time_steps(runner, variants, dict(timed_spec, steps=0), device)  # warm-up (compiles)
            graphs_warm = compile_counters()["compile/graphs"]
            warm_s = time.perf_counter() - t0
            timed = _time_steps(runner, variants, dict(timed_spec, warmup=0), device)
            graphs_after = compile_counters()["compile/graphs"]
        except Exception as err:  # noqa: BLE001 - one lever's failure must not end the sweep
            rows.extend(dict(base, variant=v, error=f"{type(err).__name__}: {str(err)[:300]}") for v in variants)
            runner.reset()
            _free(device)
            report(rows)
            continue
        for variant in variants:
            t = timed[variant]
            rows.append(dict(base, variant=variant, frozen_dtype=str(runner.weight_dtype).replace("torch.", ""),
                             steps_timed=len(t["step_s_all"]),
                             warmup=timed_spec["warmup"], step_s=round(t["step_s"], 4),
                             step_s_all=[round(x, 4) for x in t["step_s_all"]],
                             pairs_per_s=round(common["batch"] / t["step_s"], 4),
                             peak_mem_mb=round(t["peak_mem_mb"], 1), loss_finite=t["loss_finite"],
                             setup_and_warmup_s=round(warm_s, 1), compiled_graphs=graphs_warm - graphs_before,
                             recompiles_while_timed=graphs_after - graphs_warm))
        report(rows)
    return rows


def _profile(runner, variants: list[str], device, top: int = 15) -> dict[str, list[dict[str, Any]]]:
    """One more step of each variant under torch.profiler: its top operators and kernels by self time on the
    device (CPU: on the host), with their share of the step's total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for variant in variants:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            runner.step(variant)
            _sync(device)
        events = list(prof.key_averages())
        total = sum(getattr(e, attr, 0) for e in events) or 1
        events.sort(key=lambda e: getattr(e, attr, 0), reverse=True)
        out[variant] = [{"name": e.key[:160], "self_ms": round(getattr(e, attr, 0) / 1e3, 3),
                         "share": round(getattr(e, attr, 0) / total, 4), "calls": e.count} for e in events[:top]]
    return out


def _levers_name(levers: dict[str, Any]) -> str:
    parts = [f"compile={levers['compile']}" if levers.get("compile") else "",
             levers.get("compile_mode", "") if levers.get("compile_mode", "default") != "default" else "",
             "channels_last" if levers.get("channels_last") else "",
             f"attn={levers['attention']}" if levers.get("attention", "auto") != "auto" else "",
             levers.get("dtype", "") if levers.get("dtype", "bf16") != "bf16" else "",
             f"perceptual={levers['perceptual']}" if levers.get("perceptual", "same") != "same" else ""]
    return "+".join(p for p in parts if p) or "eager"


# The sweep of issue 13 (each on the paired DPO / NCP-DPO worker's U-Net and batch; compiled ones last;
# fp16 on CUDA only: the CPU has no fast fp16 matmul).
SWEEP: list[dict[str, Any]] = [
    {}, {"channels_last": True}, {"attention": "cudnn"}, {"attention": "efficient"}, {"dtype": "fp16"},
    {"perceptual": "fp32"}, {"perceptual": "tf32"}, {"perceptual": "fp16"},  # issue 26: ncp-dpo's precision
    {"compile": "regional"}, {"compile": "regional", "channels_last": True},
    {"compile": "regional", "compile_mode": "reduce-overhead"},
]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------- the driver


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _cpu_estimate_mb(model: str, variant: str) -> float:
    """Rough resident bytes of a variant's weights, gradients and optimizer state (CPU runs only)."""
    p = MODELS[model]["params"]
    if variant == "baseline":  # fp32 weights + fp32 grads + optimizer state + a bf16 reference copy
        state = 0.1 if model == "sdxl" else 8  # Adafactor (factored) vs AdamW (two fp32 moments)
        return p * (4 + 4 + state + 2) / 2**20
    return p * 2 / 2**20 + 1500  # bf16 frozen weights + LoRA, its state, activations at small sizes


def launch(spec: dict[str, Any], log) -> list[dict[str, Any]]:
    """Run one worker in a fresh interpreter; its last ``RESULT`` stdout line is the JSON rows."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    print(f"-- {spec['model']} {'+'.join(spec['variants'])} batch={spec['batch']} res={spec['resolution']} ...",
          file=log, flush=True)
    start = time.perf_counter()
    failed = [{**{k: spec[k] for k in ("model", "device", "resolution")}, "variant": v} for v in spec["variants"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (proc.kill(), sys.exit(143)))  # `timeout` kills no orphan
    try:
        stdout, _ = proc.communicate(timeout=spec.get("timeout"))
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        print(f"   -> worker timed out after {spec.get('timeout')} s", file=log, flush=True)
        done = [ln for ln in (stdout or "").splitlines() if ln.startswith("RESULT ")]
        if done:  # a sweep reports its rows after each configuration: keep those
            return json.loads(done[-1][len("RESULT "):]) + [
                dict(failed[0], variant="+".join(spec["variants"]), role=spec["role"],
                     error=f"worker timed out after {spec.get('timeout')} s (rows before it kept)")]
        return [dict(r, error=f"worker timed out after {spec.get('timeout')} s") for r in failed]
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        error = f"worker exited with {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode == -9 else "")
        print(f"   -> {error}", file=log, flush=True)
        return [dict(r, error=error) for r in failed]
    rows = json.loads(lines[-1][len("RESULT "):])
    for row in rows:
        row["wall_s"] = round(time.perf_counter() - start, 1)
        print(f"   -> {row['variant']}: batch {row.get('batch')}, step {row.get('step_s')} s, "
              f"peak {row.get('peak_mem_mb')} MB", file=log, flush=True)
    return rows


def plan_model(args, model: str, device: str) -> list[dict[str, Any]]:
    """The workers of one model, in order: what the issue's goals need first (a time limit cuts the last).

    1. ncp's DPO and NCP-DPO in one worker, alternating steps on the same LoRA U-Net, at the batch that fits
       NCP-DPO (the larger footprint): their step-time ratio at equal work.
    2. The baseline, at its own largest batch.
    3. On CUDA with an automatic batch: ncp's DPO alone, at its own largest batch (pairs/s against the baseline).
    """
    m = MODELS[model]
    resolution = args.resolution or (m["resolution"] if device == "cuda" else (64 if args.quick else 128))
    ckpt = {"auto": model == "sdxl", "on": True, "off": False}[args.checkpointing]
    offload = {"auto": model == "sdxl" and device == "cuda", "on": True, "off": False}[args.offload_ref]
    batch = args.batch or ("auto" if device == "cuda" else "1")
    base = dict(model=model, device=device, resolution=resolution, checkpointing=ckpt, batch=batch,
                steps=args.steps, warmup=args.warmup, max_batch=args.max_batch, timeout=args.worker_timeout,
                threads=args.threads, offload_ref=False)
    ncp = [v for v in NCP_VARIANTS if v in args.variants]
    workers = []
    if ncp:
        workers.append(dict(base, variants=ncp, role="paired" if len(ncp) >= 2 else "alone",
                            profile=model in args.profile))
    if "baseline" in args.variants:
        workers.append(dict(base, variants=["baseline"], offload_ref=offload, role="alone"))
    if "dpo" in ncp and len(ncp) >= 2 and batch == "auto":
        # LoRA leaves memory the baseline does not have: ncp's DPO alone starts at twice the default batch
        workers.append(dict(base, variants=["dpo"], role="own-max",
                            max_batch=args.max_batch or 2 * m["max_batch"]))
    if model in args.sweep and ncp:  # last: its compiled configurations take the longest
        sweep = [lv for lv in SWEEP[1:] if (args.sweep_compile or not lv.get("compile"))
                 and (device == "cuda" or lv.get("dtype") != "fp16")]
        workers.append(dict(base, variants=ncp, role="sweep", sweep=sweep,
                            timeout=args.sweep_timeout or args.worker_timeout))
    return workers


def run_model(args, model: str, device: str, log, results: list[dict[str, Any]], checkpoint) -> None:
    """Measure one model's workers into ``results`` (calling ``checkpoint()`` after each)."""
    for spec in plan_model(args, model, device):
        for variant in spec["variants"]:
            count_flops_later(model, variant, spec["resolution"])
        if device == "cpu":
            need = sum(_cpu_estimate_mb(model, v) for v in spec["variants"][:1])
            have = _mem_available_mb()
            if need > 0.8 * have:
                reason = f"needs ~{need / 1024:.1f} GiB, {have / 1024:.1f} GiB available"
                results.extend({**{k: spec[k] for k in ("model", "device", "resolution")}, "variant": v,
                                "role": spec["role"], "skipped": reason} for v in spec["variants"])
                print(f"-- {model} {'+'.join(spec['variants'])}: skipped ({reason})", file=log, flush=True)
                checkpoint()
                continue
        results.extend(dict(row, role=row.get("role", spec["role"])) for row in launch(spec, log))
        checkpoint()


_FLOPS: dict[tuple, Any] = {}  # (model, variant, resolution) -> Future of FLOPs per pair
_FLOPS_POOL = None


def count_flops_later(model: str, variant: str, resolution: int) -> None:
    """Start counting a variant's model FLOPs per pair (``ncp.flops``, meta tensors) in a driver thread: it
    runs while the workers measure, so it costs the GPU run no time."""
    global _FLOPS_POOL
    from concurrent.futures import ThreadPoolExecutor

    key = (model, variant, resolution)
    if key in _FLOPS:
        return
    _FLOPS_POOL = _FLOPS_POOL or ThreadPoolExecutor(1)
    _FLOPS[key] = _FLOPS_POOL.submit(flops_per_pair, model, variant, resolution)


def flops_per_pair(model: str, variant: str, resolution: int) -> int:
    from ncp.flops import full_finetune_dpo_flops, step_flops

    m = MODELS[model]
    if variant == "baseline":
        return full_finetune_dpo_flops(m["unet"], resolution, m["text_len"])
    return step_flops(m["unet"], model, resolution, variant, ["auto"], m["text_len"], LORA_RANK, LORA_TARGETS)


def add_mfu(results: list[dict[str, Any]], gpu: str | None, wait: bool) -> None:
    """Model TFLOP/s and MFU (against the GPU's peak for the row's dtype) of every measured row."""
    from ncp.flops import peak_flops_of

    for r in results:
        future = _FLOPS.get((r["model"], r["variant"], r["resolution"]))
        if "pairs_per_s" not in r or future is None or not (wait or future.done()):
            continue
        try:
            flops = future.result()
        except Exception as err:  # noqa: BLE001 - a count that fails leaves the timing intact
            r["flops_error"] = str(err)[:200]
            continue
        r["flops_per_pair"] = flops
        r["tflops"] = float(f"{flops * r['pairs_per_s'] / 1e12:.4g}")
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(r.get("frozen_dtype", ""), "")
        peak = peak_flops_of(gpu, dtype) if gpu else None
        r["mfu"] = round(r["tflops"] * 1e12 / peak, 4) if peak else None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: NCP-DPO / DPO step time (paired, same batch); ncp / baseline pairs/s and peak memory."""
    out: dict[str, Any] = {}
    for model in MODELS:
        rows = [r for r in results if r["model"] == model and "step_s" in r]

        def pick(variant: str, role: str) -> dict[str, Any] | None:
            return next((r for r in rows if r["variant"] == variant and r["role"] == role), None)

        ncp, paired_dpo = pick("ncp-dpo", "paired") or pick("ncp-dpo", "alone"), pick("dpo", "paired")
        dpo = pick("dpo", "own-max") or paired_dpo or pick("dpo", "alone")
        base = pick("baseline", "alone")
        s: dict[str, Any] = {}
        if ncp and paired_dpo:
            # Steps alternate ABBA, so the k-th timed steps of the two ran back to back: the median of their
            # ratios cancels the machine's drift better than the ratio of the medians (both reported).
            ratios = [a / b for a, b in zip(ncp["step_s_all"], paired_dpo["step_s_all"])]
            s["ncp_dpo_over_dpo_step_time"] = round(statistics.median(ratios), 3)
            s["ncp_dpo_over_dpo_step_time_of_medians"] = round(ncp["step_s"] / paired_dpo["step_s"], 3)
            s["paired_batch"] = ncp["batch"]
        for name, row in (("dpo", dpo), ("ncp_dpo", ncp)):
            if row and base:
                s[f"{name}_over_baseline_pairs_per_s"] = round(row["pairs_per_s"] / base["pairs_per_s"], 3)
                s[f"{name}_over_baseline_peak_mem"] = round(row["peak_mem_mb"] / base["peak_mem_mb"], 3)
                s[f"{name}_batch_vs_baseline_batch"] = [row["batch"], base["batch"]]
        if ncp:
            s["ncp_dpo_batch"] = ncp["batch"]
        for name, row in (("dpo", dpo), ("ncp_dpo", ncp), ("baseline", base), ("paired_dpo", paired_dpo)):
            if row and row.get("mfu") is not None:
                s[f"{name}_mfu"] = row["mfu"]
        sweep = [r for r in rows if r["role"] == "sweep"]
        for variant in ("dpo", "ncp-dpo"):
            best = max((r for r in sweep if r["variant"] == variant), key=lambda r: r["pairs_per_s"], default=None)
            if best:
                s[f"sweep_best_{variant}"] = {k: best.get(k) for k in ("levers_name", "pairs_per_s", "mfu", "batch")}
        if ncp and paired_dpo and ncp.get("mfu") and paired_dpo.get("mfu"):
            s["ncp_dpo_mfu_over_dpo_mfu"] = round(ncp["mfu"] / paired_dpo["mfu"], 3)
        if s:
            out[model] = s
    return out


def goals(results: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals (stated for an H100 at the paper's resolutions); None where not measured."""
    on_gpu_paper = [r for r in results if r["device"] == "cuda" and r["resolution"] == MODELS[r["model"]]["resolution"]]
    if not on_gpu_paper:
        return {"note": "the goals are stated for an H100 at the paper's resolutions; not evaluated on this run"}
    g: dict[str, Any] = {}
    for model, s in summary.items():  # issue 13 (best lever configuration where a sweep ran)
        best = (s.get("sweep_best_dpo") or {}).get("mfu") or s.get("dpo_mfu")
        target = goal(f"step.dpo_mfu.{model}")
        g[f"{model}: ncp DPO step >= {target:.0%} MFU"] = None if best is None else best >= target
        r, share = s.get("ncp_dpo_mfu_over_dpo_mfu"), goal("step.ncp_dpo_mfu_over_dpo_mfu")
        g[f"{model}: NCP-DPO MFU within {round(100 * (1 - share))} % of DPO's"] = None if r is None else r >= share
        if model == "sd15":
            r, x = s.get("dpo_over_baseline_pairs_per_s"), goal("step.sd15_dpo_over_baseline_pairs_per_s")
            g[f"sd15: ncp DPO pairs/s >= {x}x the baseline step"] = None if r is None else r >= x
    return g


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'model':5} {'variant':9} {'res':>5} {'batch':>5} {'step s':>8} {'pairs/s':>8} {'peak MB':>9} "
            f"{'TFLOP/s':>8} {'MFU':>6}  note")
    lines = [head, "-" * len(head)]
    for r in results:
        if "step_s" in r:
            note = ", ".join(filter(None, [
                r.get("optimizer"), r.get("frozen_dtype"), "ckpt" if r.get("checkpointing") else "",
                "ref offloaded" if r.get("offload_ref") else "", r.get("role", ""), r.get("levers_name", ""),
                f"{r['recompiles_while_timed']} recompiles timed" if r.get("levers", {}).get("compile") else "",
                f"ops {r['ops']}" if r["variant"] == "ncp-dpo" else "",
                f"OOM at {[t['batch'] for t in r['tried']]}" if r.get("tried") else ""]))
            lines.append(f"{r['model']:5} {r['variant']:9} {r['resolution']:>5} {r['batch']:>5} "
                         f"{r['step_s']:>8.3f} {r['pairs_per_s']:>8.3f} {r['peak_mem_mb']:>9.0f} "
                         f"{_fmt(r.get('tflops'), '8.3g')} {_fmt(r.get('mfu'), '6.1%')}  {note}")
        else:
            lines.append(f"{r['model']:5} {r['variant']:9} {r['resolution']:>5} {'-':>5} {'-':>8} {'-':>8} {'-':>9} "
                         f"{'-':>8} {'-':>6}  {r.get('levers_name', '')} {r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{x:{spec}}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--model", default="both", choices=["sd15", "sdxl", "both"])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of baseline,dpo,ncp-dpo "
                                                                             "(and mapo,ncp-mapo on request)")
    p.add_argument("--resolution", type=int, help="pixels (default: 512 / 1024 on CUDA, 128 on CPU, 64 with --quick)")
    p.add_argument("--batch", help="pairs per step, or 'auto' = the largest power of two that fits "
                                   "(default: auto on CUDA, 1 on CPU)")
    p.add_argument("--max-batch", type=int, help="the first batch 'auto' tries (default: 16 SD1.5, 8 SDXL)")
    p.add_argument("--steps", type=int, help="timed steps (default 5 on CUDA, 3 on CPU, 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="gradient checkpointing of the trained U-Net (auto: SDXL only, as the reference script)")
    p.add_argument("--offload-ref", default="auto", choices=["auto", "on", "off"],
                   help="baseline's reference U-Net on the CPU via accelerate.cpu_offload (auto: SDXL on CUDA, "
                        "as the reference script)")
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's choice); on a shared "
                                               "CPU, 1 avoids OpenMP spin-waiting against other processes")
    p.add_argument("--sweep", default="", help="comma list of models (sd15,sdxl) whose paired DPO / NCP-DPO worker "
                                               "then times each speed-lever configuration (SWEEP) on its U-Net")
    p.add_argument("--profile", default="", help="comma list of models whose paired worker then profiles one "
                                                 "step of each variant (torch.profiler; top kernels in the JSON)")
    p.add_argument("--sweep-timeout", type=float, help="seconds for the sweep worker (default: --worker-timeout); "
                                                      "a timeout keeps the configurations already timed")
    p.add_argument("--no-sweep-compile", dest="sweep_compile", action="store_false",
                   help="leave the torch.compile configurations out of the sweep (CPU: inductor compiles for minutes)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny resolution on CPU, 1 warm-up + 2 steps")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds per measurement (default: none)")
    p.add_argument("--out", default=str(HERE / "results" / "step.json"), help="JSON result file")
    p.add_argument("--summarize", metavar="JSON", help="recompute the summary, goals and table of a result file "
                                                        "from its per-step times (rewrites the file)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.sweep = [m for m in args.sweep.split(",") if m]
    args.profile = [m for m in args.profile.split(",") if m]
    unknown = set(args.variants) - set(VARIANTS) - set(NCP_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(dict.fromkeys(VARIANTS + NCP_VARIANTS))}")
    return args


def write_report(report: dict[str, Any], outs: list[Path]) -> dict[str, Any]:
    """Writes ``report`` as JSON to every path in ``outs`` (their folders made) and returns it."""
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(table_text: str, report: dict[str, Any], outs: list[Path]) -> int:
    """Prints the table, the summary and goals, and where the JSON went; exit status 1 if any row failed."""
    print(table_text)
    print(json.dumps({"summary": report["summary"], "goals": report["goals"]}, indent=2))
    for out in outs:
        print(f"wrote {out}")
    rows = report.get("results", report.get("rows", []))
    return 0 if all("error" not in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)  # list of rows
        return 0
    if args.summarize:
        path = Path(args.summarize)
        report = json.loads(path.read_text())
        report["summary"] = summarize(report["results"])
        report["goals"] = goals(report["results"], report["summary"])
        print_report(table(report["results"]), write_report(report, [path]), [path])
        return 0
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device == "cuda"
    args.steps = args.steps or (2 if args.quick else (5 if on_cuda else 3))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not on_cuda else 2)
    models = list(MODELS) if args.model == "both" else [args.model]
    started = datetime.datetime.now(datetime.timezone.utc)
    command = "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else " ".join(argv)
    info = machine(device)
    outs = [Path(args.out)] + ([Path(os.environ["OUT"]) / "step.json"] if os.environ.get("OUT") else [])
    results: list[dict[str, Any]] = []

    def write(final: bool) -> dict[str, Any]:
        """The report so far: written after every measurement, so a run cut short by a time limit keeps them."""
        add_mfu(results, info.get("gpu"), wait=final)
        summary = summarize(results)
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        report = {"benchmark": "step", "date": started.isoformat(timespec="seconds"), "command": command,
                  "complete": final, "machine": info, "device": device, "results": results, "summary": summary,
                  "goals": goals(results, summary), "total_s": round(elapsed, 1)}
        return write_report(report, outs)

    for model in models:
        run_model(args, model, device, sys.stderr, results, lambda: write(False))
    return print_report(table(results), write(True), outs)


if __name__ == "__main__":
    sys.exit(main())
