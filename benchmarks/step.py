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
ncp's variants: LoRA rank 64 on to_q/to_k/to_v/to_out.0 (``ncp.models.add_lora``),
``ncp.train.build_optimizer`` (8-bit AdamW on CUDA, torch AdamW on CPU), frozen
weights and autocast in bf16; the reference is the same U-Net with its adapters
disabled.

Every (model, variant) runs in its own subprocess, one after the other, so each
gets a clean peak-memory reading (CUDA: ``max_memory_allocated``; CPU: the
worker's peak RSS). Timed steps follow warm-up steps; the median is reported.
On CUDA the batch is the largest power of two that fits (``--batch auto``);
ncp's DPO is also timed at NCP-DPO's batch so that their step times compare.

    python benchmarks/step.py                          # CUDA if present, else a reduced CPU run
    python benchmarks/step.py --device cpu --model sd15 --resolution 128 --batch 1 --steps 3
    python benchmarks/step.py --quick                  # smoke test: tiny resolution, 1+2 steps

Writes benchmarks/results/step.json (and $OUT/step.json when $OUT is set) and prints a table.
"""
from __future__ import annotations

import argparse
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
        self.unet = _build_unet(MODELS[spec["model"]]["unet"], device, torch.float32)  # trained in full
        self.unet.train()
        if spec["checkpointing"]:
            self.unet.enable_gradient_checkpointing()
        self.offload = spec["offload_ref"]
        self.ref = _build_unet(MODELS[spec["model"]]["unet"], device, self.half)  # the full frozen copy
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
        self.scaler = torch.amp.GradScaler("cuda") if self.half == torch.float16 and on_cuda else None
        self.scheduler = DDPMScheduler.from_config(SCHEDULER)
        self.trainable = sum(p.numel() for p in self.unet.parameters())
        self.optimizer_name = type(self.opt).__name__

    def set_batch(self, batch: int) -> None:
        self.batch = batch
        self.inp = _inputs(self.spec, batch, self.half, self.device)

    def step(self) -> float:
        torch, inp, b = self.torch, self.inp, self.batch
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
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if not self.adafactor:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reset(self) -> None:
        self.opt.zero_grad(set_to_none=True)


class NcpStep:
    """ncp's step: LoRA policy, ``preference_step`` with the dpo or ncp-dpo objective, build_optimizer."""

    def __init__(self, spec: dict[str, Any], device):
        import torch
        from diffusers import DDPMScheduler

        from ncp.config import OptimConfig
        from ncp.models import add_lora, resolve_taps
        from ncp.objectives import OBJECTIVES
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
        self.objective = OBJECTIVES[spec["variant"]]
        self.taps = resolve_taps(["auto"], spec["model"], len(self.unet.down_blocks))
        self.tap_weights = [1.0 / len(self.taps)] * len(self.taps)
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer_name = type(self.opt).__module__.split(".")[0] + "." + type(self.opt).__name__
        self.gen = torch.Generator(device).manual_seed(0)

    def set_batch(self, batch: int) -> None:
        from ncp.models import Conditioning

        self.batch = batch
        self.inp = _inputs(self.spec, batch, self.dtype, self.device)
        self.cond = Conditioning(self.inp["hidden"], self.inp["pooled"], self.inp["time_ids"])

    def step(self) -> float:
        from ncp.step import preference_step, sample_noise

        torch = self.torch
        x0 = self.inp["x0"]
        noise = sample_noise(self.batch, tuple(x0.shape[1:]), self.schedule.num_timesteps, self.gen, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype):
            out = preference_step(self.unet, self.unet, self.schedule, self.objective,
                                  dict(beta=BETA, beta_cpo=BETA, cpo_lambda=1.0), x0, self.cond, noise,
                                  self.taps, self.tap_weights)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.lr_schedule.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def reset(self) -> None:
        self.opt.zero_grad(set_to_none=True)


_OPTIMIZER_SOURCE = "ncp.train.build_optimizer"


def _build_optimizer(params, cfg, device):
    """``ncp.train.build_optimizer``. Importing ncp.train also imports the data stack (pyarrow, PIL); where
    that is missing (a bare GPU machine), the same optimizer is built here and the result says so."""
    global _OPTIMIZER_SOURCE
    import torch

    try:
        from ncp.train import build_optimizer
    except ImportError as err:
        _OPTIMIZER_SOURCE = f"local copy of build_optimizer (ncp.train not importable: {err})"
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        if device.type == "cuda":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            opt = torch.optim.AdamW(params, **kwargs)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return build_optimizer(params, cfg, device)


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


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one variant, find the batch (largest that fits, or the given one), warm up, time."""
    import torch

    import ncp.ops

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    runner = BaselineStep(spec, device) if spec["variant"] == "baseline" else NcpStep(spec, device)
    build_s = time.perf_counter() - t0
    resident_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
    tried: list[dict[str, Any]] = []
    times: list[float] = []
    losses: list[float] = []
    chosen = None
    for batch in _candidates(spec):
        runner.set_batch(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses, failed = [], [], None
        for i in range(spec["warmup"] + spec["steps"]):
            try:
                _sync(device)
                start = time.perf_counter()
                losses.append(runner.step())
                _sync(device)
                if i >= spec["warmup"]:
                    times.append(time.perf_counter() - start)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                failed = f"out of memory at step {i}"
                break
        if failed is None:
            chosen = batch
            break
        tried.append({"batch": batch, "result": failed})
        runner.reset()
        runner.inp = None
        _free(device)
    result: dict[str, Any] = {
        **{k: spec[k] for k in ("model", "variant", "device", "resolution", "checkpointing", "offload_ref")},
        "latent": spec["resolution"] // 8,
        "batch": chosen, "tried": tried, "build_s": round(build_s, 2),
        "trainable_params": runner.trainable, "optimizer": runner.optimizer_name,
        "optimizer_source": getattr(runner, "optimizer_source", "train.py of DiffusionDPO (see BaselineStep)"),
        "frozen_dtype": str(getattr(runner, "half", getattr(runner, "dtype", None))).replace("torch.", ""),
        "ops": "fused" if device.type in ncp.ops.FUSED_DEVICES else "reference",
        "resident_mb": round(resident_mb, 1), "threads": torch.get_num_threads(),
    }
    if chosen is None:
        result["error"] = "no batch size fits"
        return result
    median = statistics.median(times)
    result.update({
        "steps_timed": len(times), "warmup": spec["warmup"], "step_s": round(median, 4),
        "step_s_all": [round(t, 4) for t in times], "pairs_per_s": round(chosen / median, 4),
        "peak_mem_mb": round(_peak_mb(device), 1), "loss_finite": all(map(_finite, losses)),
    })
    return result


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


def launch(spec: dict[str, Any], log) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    print(f"-- {spec['model']} {spec['variant']} batch={spec['batch']} res={spec['resolution']} ...", file=log,
          flush=True)
    start = time.perf_counter()
    res = {k: spec[k] for k in ("model", "variant", "device", "resolution")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (proc.kill(), sys.exit(143)))  # `timeout` kills no orphan
    try:
        stdout, _ = proc.communicate(timeout=spec.get("timeout"))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        res["error"] = f"worker timed out after {spec.get('timeout')} s"
        print(f"   -> {res['error']}", file=log, flush=True)
        return res
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        res["error"] = f"worker exited with {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode == -9 else "")
        print(f"   -> {res['error']}", file=log, flush=True)
        return res
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"   -> batch {res.get('batch')} step {res.get('step_s')} s, peak {res.get('peak_mem_mb')} MB",
          file=log, flush=True)
    return res


def plan_model(args, model: str, device: str) -> list[dict[str, Any]]:
    """The measurements of one model; on CUDA the batches depend on earlier results (see run_model)."""
    m = MODELS[model]
    resolution = args.resolution or (m["resolution"] if device == "cuda" else (64 if args.quick else 128))
    ckpt = {"auto": model == "sdxl", "on": True, "off": False}[args.checkpointing]
    offload = {"auto": model == "sdxl" and device == "cuda", "on": True, "off": False}[args.offload_ref]
    batch = args.batch or ("auto" if device == "cuda" else "1")
    base = dict(model=model, device=device, resolution=resolution, checkpointing=ckpt, batch=batch,
                steps=args.steps, warmup=args.warmup, max_batch=args.max_batch, timeout=args.worker_timeout,
                threads=args.threads)
    return [dict(base, variant=v, offload_ref=offload and v == "baseline") for v in args.variants]


def run_model(args, model: str, device: str, log, results: list[dict[str, Any]], checkpoint) -> None:
    """Measure one model's variants into ``results`` (calling ``checkpoint()`` after each)."""
    specs = {s["variant"]: s for s in plan_model(args, model, device)}
    # Order: what the goals need first (a time limit cuts the last ones): NCP-DPO and DPO at the same
    # batch, the baseline, then DPO at its own largest batch.
    for variant in ("ncp-dpo", "baseline", "dpo"):
        spec = specs.get(variant)
        if spec is None:
            continue
        if device == "cpu":
            need, have = _cpu_estimate_mb(model, variant), _mem_available_mb()
            if need > 0.8 * have:
                results.append({k: spec[k] for k in ("model", "variant", "device", "resolution")} | {
                    "skipped": f"needs ~{need / 1024:.1f} GiB, {have / 1024:.1f} GiB available"})
                print(f"-- {model} {variant}: skipped ({results[-1]['skipped']})", file=log, flush=True)
                checkpoint()
                continue
        res = launch(spec, log)
        results.append(res)
        checkpoint()
        if variant == "ncp-dpo" and spec["batch"] == "auto" and "dpo" in specs and res.get("batch"):
            # ncp's DPO at NCP-DPO's batch: their step times compare at equal work.
            results.append(dict(launch(dict(specs["dpo"], batch=str(res["batch"])), log), role="same-batch"))
            checkpoint()


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios per model: NCP-DPO / DPO step time at the same batch; ncp DPO / baseline pairs/s and memory."""
    out: dict[str, Any] = {}
    for model in MODELS:
        rows = [r for r in results if r["model"] == model and "step_s" in r]
        if not rows:
            continue
        ncp = next((r for r in rows if r["variant"] == "ncp-dpo"), None)
        own = {r["variant"]: r for r in rows if r.get("role") != "same-batch"}
        same = next((r for r in rows if r["variant"] == "dpo" and ncp and r["batch"] == ncp["batch"]), None)
        base, dpo = own.get("baseline"), own.get("dpo") or same
        s: dict[str, Any] = {}
        if ncp and same:
            s["ncp_dpo_over_dpo_step_time"] = round(ncp["step_s"] / same["step_s"], 3)
            s["same_batch"] = ncp["batch"]
        if dpo and base:
            s["dpo_over_baseline_pairs_per_s"] = round(dpo["pairs_per_s"] / base["pairs_per_s"], 3)
            s["dpo_over_baseline_peak_mem"] = round(dpo["peak_mem_mb"] / base["peak_mem_mb"], 3)
        if ncp and base:
            s["ncp_dpo_over_baseline_pairs_per_s"] = round(ncp["pairs_per_s"] / base["pairs_per_s"], 3)
            s["ncp_dpo_over_baseline_peak_mem"] = round(ncp["peak_mem_mb"] / base["peak_mem_mb"], 3)
        if ncp:
            s["ncp_dpo_batch"] = ncp["batch"]
        out[model] = s
    return out


def goals(results: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals (stated for an H100 at the paper's resolutions); None where not measured."""
    on_gpu_paper = [r for r in results if r["device"] == "cuda" and r["resolution"] == MODELS[r["model"]]["resolution"]]
    if not on_gpu_paper:
        return {"note": "the goals are stated for an H100 at the paper's resolutions; not evaluated on this run"}
    g: dict[str, Any] = {}
    for model, s in summary.items():
        r = s.get("ncp_dpo_over_dpo_step_time")
        g[f"{model}: NCP-DPO step <= 1.3x ncp DPO step"] = None if r is None else r <= 1.3
        r = s.get("dpo_over_baseline_pairs_per_s")
        g[f"{model}: ncp DPO pairs/s >= 1.5x baseline"] = None if r is None else r >= 1.5
    if "sdxl" in summary:
        b = summary["sdxl"].get("ncp_dpo_batch")
        g["sdxl: NCP-DPO at 1024 px with batch >= 4 pairs"] = None if b is None else b >= 4
    return g


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'model':5} {'variant':9} {'res':>5} {'batch':>5} {'step s':>8} {'pairs/s':>8} {'peak MB':>9}  note"
    lines = [head, "-" * len(head)]
    for r in results:
        if "step_s" in r:
            note = ", ".join(filter(None, [
                r.get("optimizer"), r.get("frozen_dtype"), "ckpt" if r.get("checkpointing") else "",
                "ref offloaded" if r.get("offload_ref") else "", r.get("role", ""),
                f"OOM at {[t['batch'] for t in r['tried']]}" if r.get("tried") else ""]))
            lines.append(f"{r['model']:5} {r['variant']:9} {r['resolution']:>5} {r['batch']:>5} "
                         f"{r['step_s']:>8.3f} {r['pairs_per_s']:>8.3f} {r['peak_mem_mb']:>9.0f}  {note}")
        else:
            lines.append(f"{r['model']:5} {r['variant']:9} {r['resolution']:>5} {'-':>5} {'-':>8} {'-':>8} {'-':>9}  "
                         f"{r.get('skipped') or r.get('error')}")
    return "\n".join(lines)


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
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--model", default="both", choices=["sd15", "sdxl", "both"])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of baseline,dpo,ncp-dpo")
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
    p.add_argument("--quick", action="store_true", help="smoke test: tiny resolution on CPU, 1 warm-up + 2 steps")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds per measurement (default: none)")
    p.add_argument("--out", default=str(HERE / "results" / "step.json"), help="JSON result file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
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
        summary = summarize(results)
        elapsed = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        report = {"benchmark": "step", "date": started.isoformat(timespec="seconds"), "command": command,
                  "complete": final, "machine": info, "device": device, "results": results, "summary": summary,
                  "goals": goals(results, summary), "total_s": round(elapsed, 1)}
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    for model in models:
        run_model(args, model, device, sys.stderr, results, lambda: write(False))
    report = write(True)
    print(table(results))
    print(json.dumps({"summary": report["summary"], "goals": report["goals"]}, indent=2))
    for out in outs:
        print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
