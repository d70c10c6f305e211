"""The flow world: the bundled world's scenes, judge and flawed captioner, with a Stable Diffusion 3 base model.

``python -m ncp.world build --family sd3 --out DIR`` pretrains a small MM-DiT pipeline (``StableDiffusion3Pipeline``:
an ``SD3Transformer2DModel``, a 16-channel VAE with SD3's shift and scale, two CLIPs and a T5) on the scene
stream, as the SD1.5 world's U-Net is, and then makes the same preference data from its samples, so the
objectives of ``--config sd3`` can be compared on a model of the family they are written for.

What differs from the U-Net world (``ncp.world.pretrain``), and why:

* the loss is rectified flow's, ``||v_theta(x_sigma, 1000 sigma) - (eps - x0)||^2`` with SD3's logit-normal
  sigma density (``ncp.schedule.FlowSchedule``, the density ncp trains with), no min-SNR weight;
* the scheduler is unshifted (``shift`` 1.0): SD3's 3.0 is for 1024 px, and the SD3 paper's resolution rule
  (shift ``sqrt(m / n)`` against a 256 px base) would go below 1 at 32 px;
* the VAE has three blocks (32 px images are 8x8x16 latents, 16 image tokens at patch size 2) and both its
  ``scaling_factor`` and ``shift_factor`` are measured from the latents, as SD3's are;
* T5 reads 24 tokens (its tokenizer's ``model_max_length``; ncp's SD3 family encodes and samples with
  ``min(256, model_max_length)`` tokens, ``ncp.families.base.t5_length``): the world's captions are under 24
  tokens, and 256 padding tokens would make each step about six times dearer;
* the conditioning is the family's own ``encode`` (``StableDiffusion3Pipeline.encode_prompt``'s), so the base
  model is trained on exactly what ncp and the pipeline feed it; all three text encoders train in the first,
  truthful phase and are frozen afterwards, as the U-Net world's CLIP is.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch

from ncp.world.flow_model import FlowSpec, save_sd3, sd3_pipeline
from ncp.world.pretrain import PretrainConfig, SceneStream, _ema_update, _lr_lambda, encode_pool, train_vae

# 32 px, as the U-Net world; about 0.9 M transformer parameters (the U-Net world's U-Net: 1.7 M)
WORLD_FLOW_SPEC = FlowSpec(
    resolution=32, vae_channels=(16, 32, 32), latent_channels=16, patch_size=2, num_layers=6,
    attention_head_dim=16, num_attention_heads=4, pos_embed_max_size=16, clip_hidden=(32, 32),
    clip_projection=(32, 32), clip_layers=2, clip_heads=4, clip_tokens=24, t5_d_model=64, t5_layers=2,
    t5_heads=4, t5_max_length=24)
TINY_WORLD_FLOW_SPEC = FlowSpec(
    resolution=32, vae_channels=(8, 8, 16), latent_channels=16, patch_size=2, num_layers=2,
    attention_head_dim=8, num_attention_heads=2, pos_embed_max_size=8, clip_hidden=(16, 16),
    clip_projection=(16, 16), clip_layers=1, clip_heads=2, clip_tokens=24, t5_d_model=32, t5_layers=1,
    t5_heads=2, t5_max_length=24)
# a transformer takes a lower peak lr than the U-Net's 1e-3 / 5e-4 (AdamW, warmup then cosine)
FLOW_PRETRAIN = PretrainConfig(unet_steps=1500, unet_lr=5e-4, more_unet_steps=(1500,), more_unet_lr=(2.5e-4,))
SHIFT = 1.0


def train_flow_denoiser(pipe, stream: SceneStream, cfg: PretrainConfig, log: Callable[[str], None] = print,
                        steps: int | None = None, lr: float | None = None,
                        train_text_encoders: bool = True) -> None:
    """Rectified-flow training of ``pipe.transformer`` (and, with ``train_text_encoders``, its three text
    encoders); leaves the EMA weights in ``pipe``."""
    from ncp.families import family
    from ncp.schedule import FlowSchedule

    fam = family("sd3")
    steps = cfg.unet_steps if steps is None else steps
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    transformer, vae = pipe.transformer, pipe.vae
    for enc in encoders:
        enc.requires_grad_(train_text_encoders).train(train_text_encoders)
    params = list(transformer.parameters()) + ([p for e in encoders for p in e.parameters()]
                                               if train_text_encoders else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr if lr is None else lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, steps))
    ema = [copy.deepcopy(m).eval() for m in (transformer, *encoders)]
    transformer.requires_grad_(True).train()  # a later phase starts from the last (frozen) EMA copy
    vae.eval().requires_grad_(False)
    flow = FlowSchedule.from_scheduler(pipe.scheduler, torch.device("cpu"), "logit_normal")
    g = torch.Generator().manual_seed(stream.rng.randrange(2**31))
    pool_caps, pool_mean, pool_std = encode_pool(vae, stream, cfg.latent_pool)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pool_caps), (cfg.unet_batch,), generator=g)
        captions = ["" if stream.rng.random() < cfg.caption_dropout else pool_caps[i] for i in idx.tolist()]
        eps0 = torch.randn(pool_mean[idx].shape, generator=g)
        x0 = (pool_mean[idx] + pool_std[idx] * eps0 - shift) * scale
        noise = torch.randn(x0.shape, generator=g)
        i = flow.sample_indices(x0.shape[0], g, "logit_normal")
        cond = fam.encode(tokenizers, encoders, captions, torch.device("cpu"), torch.float32)
        pred = fam.denoise(transformer, flow.add_noise(x0, noise, i), flow.timesteps(i), cond)
        loss = (pred - flow.target(x0, noise, i)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        for e, m in zip(ema, (transformer, *encoders)):
            if m is transformer or train_text_encoders:  # a frozen encoder is its own EMA
                _ema_update(e, m, decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3 = ema
    for m in ema:
        m.requires_grad_(False)


def pretrain_sd3(out: Path, spec: FlowSpec, pre: PretrainConfig, seed: int, heldout: list[str],
                 log: Callable[[str], None], reuse_stages: bool, timings: dict[str, float]):
    """The SD3 world's base pipeline, trained (or reloaded from ``out/.stages``) and saved in ``out/model``.
    Stages as the U-Net world's: the VAE, then each denoiser phase."""
    from diffusers import StableDiffusion3Pipeline

    res = spec.resolution
    stages = out / ".stages"
    t0 = time.time()
    pipe = sd3_pipeline(spec, seed, shift=SHIFT)
    if reuse_stages and (stages / "model_index.json").is_file():
        pipe.vae = StableDiffusion3Pipeline.from_pretrained(stages).vae
        log(f"reusing the VAE of {stages}")
    else:
        train_vae(pipe.vae, SceneStream(seed + 1, res, set(heldout)), pre, log, shift=True)
        save_sd3(pipe, stages)
    timings["vae_s"] = time.time() - t0

    t0 = time.time()
    for phase, (steps, lr) in enumerate(pre.phases()):
        folder = stages / f"phase{phase + 1}"
        if reuse_stages and (folder / "model_index.json").is_file():
            kept = StableDiffusion3Pipeline.from_pretrained(folder)
            for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
                setattr(pipe, name, getattr(kept, name))
            log(f"reusing the transformer and text encoders of {folder}")
            continue
        clean = phase < pre.clean_phases
        confusion = 0.0 if clean else pre.color_confusion
        log(f"transformer phase {phase + 1}: {steps} steps, lr {lr:g}, "
            + ("truthful captions, text encoders trained" if clean
               else f"colour confusion {confusion:g}, text encoders frozen"))
        train_flow_denoiser(pipe, SceneStream(seed + 3 + 10 * phase, res, set(heldout), confusion,
                                              pre.confused_colors),
                            pre, log, steps=steps, lr=lr, train_text_encoders=clean)
        save_sd3(pipe, folder)
    timings["unet_s"] = time.time() - t0
    save_sd3(pipe, out / "model")
    return pipe
