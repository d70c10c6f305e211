"""CPU pretraining of the world's base model: the VAE, then the U-Net with the text encoder.

Both stages draw fresh scenes from the grammar (never a held-out prompt), so
the base model sees a stream of (image, caption) pairs as a real text-to-image
model does. The U-Net and the text encoder are trained together on the usual
epsilon-prediction loss (min-SNR weighted, 10% empty captions for
classifier-free guidance) and the EMA weights are kept.

The first denoiser phase sees truthful captions and trains the text encoder
with the U-Net; the text encoder is then frozen, as Stable Diffusion's CLIP
is, and the later phases see the captions of a flawed captioner, as web
captions are: it names red "purple" and blue "green" (and back)
``color_confusion`` of the time. The flaw so lives in the U-Net, where a LoRA
can reach it: the base model draws the wrong one of a confused pair much of
the time, which gives preference data judged from pixels a systematic error
to correct. Training the text encoder on the flawed captions too merges the
two words' embeddings, which no U-Net adapter can separate again; a world
whose only flaw is capacity leaves a small LoRA nothing to fix (both in
benchmarks/RESULTS_ARCHIVE.md, "Third session", with how much a short LoRA run corrects).
The VAE never sees captions.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from ncp.scoring.scenes import COLORS, Prompt, render, sample_prompt, scene_for


@dataclass
class PretrainConfig:
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 1e-3
    # further phases of the denoiser, each a fresh AdamW + warmup-cosine schedule from the last EMA weights
    more_unet_steps: tuple[int, ...] = (1200,)
    more_unet_lr: tuple[float, ...] = (5e-4,)
    latent_pool: int = 8000  # scenes encoded once by the VAE, then sampled for the U-Net
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # denoiser phases on truthful captions that also train the text encoder; the later
    # phases freeze it and see the flawed captioner
    clean_phases: int = 1
    # the flawed captioner: each colour word of a confused pair is replaced by its
    # partner with this probability (0 = truthful captions throughout)
    color_confusion: float = 0.6
    confused_colors: tuple[tuple[str, str], ...] = (("red", "purple"), ("blue", "green"))

    def phases(self) -> list[tuple[int, float]]:
        """(steps, peak lr) of each denoiser phase."""
        return [(self.unet_steps, self.unet_lr), *zip(self.more_unet_steps, self.more_unet_lr)]


class SceneStream:
    """Deterministic stream of (captions, uint8 images (B, 3, H, W)) drawn from the grammar.

    With ``confusion`` > 0 the captions are those of a flawed captioner: every
    colour word with a partner in ``pairs`` is replaced by the partner with
    probability ``confusion``. The images are always those of the true prompt,
    and the captioner draws from its own generator, so the images of a seed do
    not depend on it. No caption, true or flawed, is ever in ``exclude``.
    """

    def __init__(self, seed: int, resolution: int, exclude: set[str], confusion: float = 0.0,
                 pairs: tuple[tuple[str, str], ...] = ()):
        if not 0.0 <= confusion <= 1.0:
            raise ValueError(f"color_confusion must be in [0, 1], got {confusion}")
        unknown = {c for pair in pairs for c in pair} - set(COLORS)
        if unknown:
            raise ValueError(f"confused_colors names colours outside the world's palette {list(COLORS)}: {sorted(unknown)}")
        self.rng = random.Random(seed)
        self.caption_rng = random.Random(seed + 7_919)
        self.res = resolution
        self.exclude = exclude
        self.confusion = confusion
        self.partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
        self._warned_truthful = False

    def prompt(self) -> Prompt:
        while True:
            p = sample_prompt(self.rng)
            if p.caption() not in self.exclude:
                return p

    def caption(self, p: Prompt) -> str:
        """The caption the (possibly flawed) captioner writes for an image of ``p``."""
        if not self.confusion or not self.partner:
            return p.caption()
        for _ in range(100):
            said = dataclasses.replace(p, color=self._name(p.color), color2=self._name(p.color2)).caption()
            if said not in self.exclude:
                return said
        # Only when every flawed naming is excluded (confusion near 1): say so once.
        if not self._warned_truthful:
            self._warned_truthful = True
            warnings.warn(f"SceneStream: 100 flawed namings of {p.caption()!r} were all held-out captions; "
                          f"using the truthful caption (color_confusion={self.confusion:g} is near 1)", stacklevel=2)
        return p.caption()

    def _name(self, color: str | None) -> str | None:
        if color in self.partner and self.caption_rng.random() < self.confusion:
            return self.partner[color]
        return color

    def batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        prompts = [self.prompt() for _ in range(n)]
        imgs = np.stack([render(scene_for(p, self.rng, self.res), self.res) for p in prompts])
        return [self.caption(p) for p in prompts], torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1
    return f


def train_vae(vae: AutoencoderKL, stream: SceneStream, cfg: PretrainConfig, log: Callable[[str], None] = print,
              shift: bool = False) -> float:
    """Reconstruction (L1 + MSE) with a small KL term; sets ``scaling_factor`` to 1 / latent std and, with
    ``shift`` (SD3's and Flux's convention, ``z = (mean - shift_factor) * scaling_factor``), ``shift_factor`` to
    the latents' mean, both measured on 256 fresh scenes. Returns the scale."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.vae_steps))
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        _, imgs = stream.batch(cfg.vae_batch)
        x = to_unit(imgs)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        _, imgs = stream.batch(256)
        z = vae.encode(to_unit(imgs)).latent_dist.mean
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    if shift:
        vae.register_to_config(shift_factor=float(z.mean()))
    return scale


def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def _snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    abar = scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, stream: SceneStream, n: int, batch: int = 256) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Captions and VAE posteriors (mean, std) of ``n`` fresh scenes."""
    caps, means, stds = [], [], []
    for i in range(0, n, batch):
        c, imgs = stream.batch(min(batch, n - i))
        post = vae.encode(to_unit(imgs)).latent_dist
        caps += c
        means.append(post.mean)
        stds.append(post.std)
    return caps, torch.cat(means), torch.cat(stds)


def train_denoiser(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                   vae: AutoencoderKL, scheduler: DDPMScheduler, stream: SceneStream, cfg: PretrainConfig,
                   log: Callable[[str], None] = print, steps: int | None = None,
                   lr: float | None = None, train_text_encoder: bool = True) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """U-Net (+ text-encoder) training; returns the EMA copies."""
    steps = cfg.unet_steps if steps is None else steps
    text_encoder.requires_grad_(train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr if lr is None else lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train(train_text_encoder)
    vae.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(stream.rng.randrange(2**31))
    pool_caps, pool_mean, pool_std = encode_pool(vae, stream, cfg.latent_pool)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pool_caps), (cfg.unet_batch,), generator=g)
        captions = ["" if stream.rng.random() < cfg.caption_dropout else pool_caps[i] for i in idx.tolist()]
        eps0 = torch.randn(pool_mean[idx].shape, generator=g)
        x0 = (pool_mean[idx] + pool_std[idx] * eps0) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encode_text(tokenizer, text_encoder, captions)).sample
        w = _snr_weight(scheduler, t, cfg.min_snr_gamma)
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if train_text_encoder:  # a frozen encoder is its own EMA
            _ema_update(ema_text, text_encoder, decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return ema_unet, ema_text
