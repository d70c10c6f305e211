"""Model FLOPs of a training step, and model FLOP utilisation (MFU).

A step's FLOPs are counted once per (U-Net config, resolution, text length,
objective shape, taps, LoRA) with ``torch.utils.flop_counter`` on ``meta``
tensors: the real step code (``ncp.step.branch_errors`` and its backward) runs
on a U-Net that has shapes but no storage, so counting SDXL at 1024 px takes
seconds and no memory. The counter sees only matrix products, convolutions and
attention (elementwise work is not counted, as in every MFU figure), and counts
what autograd actually runs: a frozen weight's backward computes only the
input gradient, a LoRA weight's also its weight gradient, an attention's
backward both operands' gradients. Gradient checkpointing's recomputation is not
counted (model FLOPs, not hardware FLOPs), so MFU does not reward recomputing.

FLOPs are linear in the batch (every op is per-sample), so they are counted for
one pair and multiplied.

    >>> flops_per_pair = step_flops(unet.config, "sd15", 512, "ncp-dpo", ["mid"])
    >>> mfu = flops_per_pair * pairs_per_s / peak_flops("cuda", torch.bfloat16)
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ncp.criterion import Criterion
from ncp.families.dit import default_taps
from ncp.models import Conditioning, add_lora
from ncp.objectives import OBJECTIVES
from ncp.schedule import NoiseSchedule
from ncp.step import StepNoise, branch_errors

logger = logging.getLogger(__name__)

# Peak dense (no sparsity) tensor-core FLOP/s of bf16 and fp16 inputs, per GPU, from the vendors'
# data sheets. Matched against torch.cuda.get_device_name() by substring, first match wins (so the
# more specific names come first). fp32 training (TF32 or not) has no entry: MFU is then None.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp16": 756.0e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12}),
    ("L40S", {"bf16": 362.05e12, "fp16": 362.05e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12}),
]
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def peak_flops(device: torch.device | str, dtype: torch.dtype | str, override_tflops: float | None = None
               ) -> float | None:
    """Peak dense FLOP/s of ``device`` for ``dtype`` (bf16 / fp16), or None when unknown (a CPU, fp32,
    a GPU not in ``PEAK_FLOPS``). ``override_tflops`` (config ``logging.peak_tflops``) wins."""
    if override_tflops:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if device.type != "cuda" or not torch.cuda.is_available() or name not in ("bf16", "fp16"):
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), name)


def peak_flops_of(gpu_name: str, dtype_name: str) -> float | None:
    """Peak dense FLOP/s of a GPU named as ``torch.cuda.get_device_name`` names it."""
    for key, peaks in PEAK_FLOPS:
        if key in gpu_name:
            return peaks.get(dtype_name)
    return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of this config with meta parameters (shapes only), frozen."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    return unet.requires_grad_(False)


def meta_conditioning(config: Mapping[str, Any], batch: int, text_len: int):
    """Random-shaped text condition on meta: hidden states, and SDXL's pooled embedding and time ids."""
    width = config["cross_attention_dim"]
    hidden = torch.empty(batch, text_len, width, device="meta")
    if config.get("addition_embed_type") != "text_time":
        return Conditioning(hidden)
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return Conditioning(hidden, torch.empty(batch, pooled_dim, device="meta"), torch.empty(batch, 6, device="meta"))


def _meta_schedule():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # the SD schedule; values do not change FLOPs
    return NoiseSchedule(betas=betas.to("meta"), alphas_cumprod=torch.cumprod(1 - betas, 0).to("meta"),
                         prediction_type="epsilon")


@functools.lru_cache(maxsize=32)
def _flops_per_pair(config_json: str, kind: str, resolution: int, text_len: int, objective: str,
                    taps: tuple, lora_rank: int, lora_targets: tuple[str, ...]) -> int:
    config = json.loads(config_json)
    unet = meta_unet(config)
    if lora_rank > 0:
        add_lora(unet, lora_rank, float(lora_rank), list(lora_targets), 0.0)
    perceptual = OBJECTIVES[objective].space == "perceptual"
    criterion = Criterion.make(objective, _meta_schedule(), kind=kind, num_down_blocks=len(unet.down_blocks),
                               **({"taps": list(taps)} if perceptual else {}))
    n = 2 if criterion.needs_losers else 1
    latent = (config.get("in_channels", 4), resolution // 8, resolution // 8)
    noise = StepNoise(torch.ones(1, dtype=torch.long, device="meta"), torch.empty(1, *latent, device="meta"),
                      torch.empty(1, *latent, device="meta"))
    x0 = torch.empty(n, *latent, device="meta")
    cond = meta_conditioning(config, 1, text_len)

    def step() -> None:
        err, err_ref = branch_errors(criterion, unet, unet, x0, cond, noise)
        err.sum().backward()  # the loss is elementwise in the errors: its backward has the step's FLOPs

    return count_flops(step)


def step_flops(unet_config: Mapping[str, Any], kind: str, resolution: int, objective: str, taps: Sequence[Any],
               text_len: int = 77, lora_rank: int = 64,
               lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"), batch: int = 1) -> int:
    """Model FLOPs of one training micro-step of ``batch`` pairs (forward and backward of every U-Net pass
    the objective runs: policy, reference, perceptual encoder branches). Counted once per setting."""
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    key = json.dumps(config, sort_keys=True, default=list)
    return batch * _flops_per_pair(key, kind, resolution, text_len, objective, tuple(str(t) for t in taps),
                                   lora_rank, tuple(lora_targets))


def full_finetune_dpo_flops(unet_config: Mapping[str, Any], resolution: int, text_len: int = 77,
                            batch: int = 1) -> int:
    """Model FLOPs of Diffusion-DPO's own step (``benchmarks/step.py``'s baseline): the whole U-Net trained
    on 2B images (forward, backward with weight gradients), plus the frozen reference copy's forward."""
    config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    unet = meta_unet(config)
    latent = (config.get("in_channels", 4), resolution // 8, resolution // 8)
    cond = meta_conditioning(config, 2, text_len)
    x = torch.empty(2, *latent, device="meta")
    t = torch.ones(2, dtype=torch.long, device="meta")
    kwargs = dict(encoder_hidden_states=cond.hidden_states, added_cond_kwargs=cond.added_cond_kwargs())

    def step() -> None:
        with torch.no_grad():
            unet(x, t, **kwargs)  # the reference
        unet.requires_grad_(True)
        try:
            unet(x, t, **kwargs).sample.sum().backward()
        finally:
            unet.requires_grad_(False)

    return batch * count_flops(step)


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's peak (None when the peak is unknown)."""
    return None if not peak else flops_per_s / peak


@dataclass
class Throughput:
    """Turns a step's pairs/s into ``perf/tflops`` (model TFLOP/s per device) and ``perf/mfu``."""

    flops_per_pair: float | None  # model FLOPs of one pair's micro-step (None: not counted)
    peak: float | None  # peak FLOP/s of one device (None: unknown, no perf/mfu)
    world_size: int = 1

    def metrics(self, pairs_per_s: float) -> dict[str, float]:
        if not self.flops_per_pair:
            return {}
        per_device = self.flops_per_pair * pairs_per_s / self.world_size
        out = {"perf/tflops": per_device / 1e12}
        if self.peak:
            out["perf/mfu"] = per_device / self.peak
        return out


def training_throughput(unet: torch.nn.Module, criterion: Criterion, *, kind: str, resolution: int, text_len: int,
                        lora_rank: int, lora_targets: Sequence[str], device: torch.device, precision: str,
                        world_size: int, peak_tflops: float | None = None,
                        latent_side: int | None = None) -> Throughput:
    """The trainer's ``Throughput``: the FLOPs of ``criterion``'s step counted once (a failure to count is logged
    and leaves perf/tflops out; it never stops training). ``precision``: the autocast or weight dtype (bf16,
    fp16, fp32). A flow transformer (SD3, Flux) is counted by ``dit_step_budget`` with its own config, the
    trainer's text length and ``latent_side`` (the latent's side in pixels of the VAE; default resolution / 8)."""
    try:
        if dict(unet.config).get("_class_name") in DIT_TEXT_TOKENS:  # a flow transformer: count it as one
            flops = dit_step_budget(dict(unet.config), resolution, criterion.name,
                                    [int(t) for t in criterion.taps], lora_rank, lora_targets,
                                    text_len=text_len, latent_side=latent_side)["flops_per_pair"]
        else:
            flops = step_flops(unet.config, kind, resolution, criterion.name,
                               [str(t) for t in criterion.taps] or ["mid"], text_len, lora_rank, lora_targets)
    except Exception as err:  # noqa: BLE001 - a metric must not stop a run
        logger.warning("could not count the step's FLOPs (%s): no perf/tflops, perf/mfu", err)
        flops = None
    peak = peak_flops(device, precision, peak_tflops)
    if flops:
        logger.info("model FLOPs per pair and micro-step: %.3g TFLOP; peak %s", flops / 1e12,
                    f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no perf/mfu)")
    return Throughput(flops, peak, world_size)


# ---------------------------------------------------------------- flow transformers (SD3.5, Flux.1)

# The transformers' published configs (their transformer/config.json); the parameter counts they give on meta
# (8.06e9 SD3.5-large, 11.90e9 Flux.1-dev) are the models' stated 8B and 12B (tests/test_flops.py).
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3.5-large": {"_class": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
                    "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
                    "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "flux.1-dev": {"_class": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
                   "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                   "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                   "axes_dims_rope": [16, 56, 56]},
}
# text tokens at training: SD3 77 CLIP + 256 T5 (the pipelines' default max_sequence_length); Flux 512 T5
DIT_TEXT_TOKENS = {"SD3Transformer2DModel": 333, "FluxTransformer2DModel": 512}
DIT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def meta_dit(name: str | Mapping[str, Any]) -> torch.nn.Module:
    """A frozen meta transformer: a ``DIT_CONFIGS`` name, or a diffusers config (``_class_name`` names the class)."""
    import diffusers

    if isinstance(name, str):
        config = dict(DIT_CONFIGS[name])
        cls = getattr(diffusers, config.pop("_class"))
    else:
        config = {k: v for k, v in dict(name).items() if not k.startswith("_")}
        cls = getattr(diffusers, dict(name)["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(config) if not isinstance(name, str) else cls(**config)
    return model.requires_grad_(False)


def _dit_call(model, resolution: int, n: int, text_len: int | None = None, latent_side: int | None = None):
    """(latents, a function (latents, sigma) -> velocity, a function (latents, sigma, taps) -> features) of a
    meta transformer at ``resolution`` px for ``n`` images (``text_len`` tokens: default the pipeline's;
    ``latent_side``: default resolution / 8)."""
    from ncp.families.dit import flux_block_features, sd3_block_features

    cfg = model.config
    text_len = text_len or DIT_TEXT_TOKENS[type(model).__name__]
    text = torch.empty(n, text_len, cfg.joint_attention_dim, device="meta")
    pooled = torch.empty(n, cfg.pooled_projection_dim, device="meta")
    side = latent_side or resolution // 8
    if type(model).__name__ == "FluxTransformer2DModel":  # packed 2x2: (n, (side / 2)^2, 4 x 16)
        x = torch.empty(n, (side // 2) ** 2, cfg.in_channels, device="meta")
        txt_ids, img_ids = torch.zeros(text_len, 3, device="meta"), torch.zeros((side // 2) ** 2, 3, device="meta")
        guidance = torch.empty(n, device="meta") if cfg.guidance_embeds else None

        def velocity(z, s):
            return model(hidden_states=z, timestep=s, guidance=guidance, encoder_hidden_states=text,
                         pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids).sample

        def features(z, s, taps):
            return flux_block_features(model, z, s, text, pooled, txt_ids, img_ids, guidance, taps)
    else:
        x = torch.empty(n, cfg.in_channels, side, side, device="meta")

        def velocity(z, s):
            return model(hidden_states=z, timestep=s * 1000, encoder_hidden_states=text,
                         pooled_projections=pooled).sample

        def features(z, s, taps):
            return sd3_block_features(model, z, s * 1000, text, pooled, taps)
    return x, velocity, features


def dit_step_budget(name: str | Mapping[str, Any], resolution: int = 1024, objective: str = "ncp-dpo",
                    taps: Sequence[int] = (), lora_rank: int = 64, lora_targets: Sequence[str] = DIT_LORA_TARGETS,
                    text_len: int | None = None, latent_side: int | None = None) -> dict[str, Any]:
    """One pair's training micro-step of a flow transformer (``DIT_CONFIGS``), counted on meta tensors with
    the definition of docs/method.md ("NCP for flow-matching transformers"): the policy's velocities of both
    images (with grad), the reference's (adapters off, no grad) and, for a perceptual objective, the frozen
    encoder on each velocity's Euler step (default taps: the blocks at a quarter and at half the depth).

    Returns the parameters (frozen, LoRA), the model FLOPs (forward and backward as autograd runs them), and
    the bytes of the tensors autograd saves for backward at 2 bytes an element (bf16): all of them (no
    gradient checkpointing), and with every block checkpointed (the grad-enabled blocks' inputs, plus the
    largest block's own saved tensors while it is recomputed), and the peak memory estimate of the latter
    with bf16 frozen weights and the LoRA in fp32 with its gradient and 8-bit Adam's two moments. Not
    counted: the latent/text cache's batch, the CUDA context and the allocator's slack (a few GB)."""
    from ncp.families.dit import perceptual_errors
    from ncp.models import adapters_disabled, add_lora

    model = meta_dit(name)
    n_frozen = sum(p.numel() for p in model.parameters())
    lora = add_lora(model, lora_rank, float(lora_rank), list(lora_targets), 0.0) if lora_rank else []
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    taps = list(taps) or default_taps(len(blocks))
    spec = OBJECTIVES[objective]
    n = 2 if spec.needs_losers else 1
    x, velocity, features = _dit_call(model, resolution, n, text_len, latent_side)
    sigma = torch.empty(n, device="meta")
    saved: list[int] = []
    inputs_bytes: list[int] = []
    inside: list[int] = []
    marks: list[int] = []

    def pack(t):
        saved.append(t.numel() * 2)
        return t

    def before(module, args, kwargs):
        if torch.is_grad_enabled():
            inputs_bytes.append(sum(v.numel() * 2 for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)))
            marks.append(len(saved))

    def after(module, args, kwargs, out):
        if torch.is_grad_enabled():
            inside.append(sum(saved[marks.pop():]))

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(before, with_kwargs=True),
                                         b.register_forward_hook(after, with_kwargs=True))]

    def step() -> None:
        v = velocity(x, sigma)
        if spec.space == "perceptual":
            with adapters_disabled(model):
                err = perceptual_errors(lambda z, s: features(z, s, taps), sigma, sigma, x, [v],
                                        torch.empty_like(x), [1.0] * len(taps))[0]
                if spec.needs_reference:
                    with torch.no_grad():
                        perceptual_errors(lambda z, s: features(z, s, taps), sigma, sigma, x,
                                          [velocity(x, sigma)], torch.empty_like(x), [1.0] * len(taps))
        else:
            err = (v.float() ** 2).flatten(1).mean(1)
            if spec.needs_reference:
                with torch.no_grad(), adapters_disabled(model):
                    velocity(x, sigma)
        err.sum().backward()

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            flops = count_flops(step)
    finally:
        for h in hooks:
            h.remove()
    checkpointed = sum(inputs_bytes) + max(inside, default=0)
    n_lora = sum(p.numel() for p in lora)
    weights = 2 * n_frozen + (4 + 4 + 2) * n_lora  # bf16 frozen; LoRA fp32 + its grad + 8-bit Adam's moments
    return {"model": name if isinstance(name, str) else dict(name)["_class_name"], "resolution": resolution, "objective": objective, "taps": taps, "images": n,
            "params_frozen": n_frozen, "params_lora": n_lora, "flops_per_pair": flops,
            "saved_bytes": sum(saved), "saved_bytes_checkpointed": checkpointed,
            "peak_bytes_checkpointed": weights + checkpointed, "weight_bytes": weights}
