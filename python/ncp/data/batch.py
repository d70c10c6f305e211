"""The backend-neutral batches every loader yields (torch Dataset, Rust loader, latent cache): preference pairs
(:class:`PairBatch`) or unpaired images with binary labels (:class:`UnpairedBatch`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class DataError(ValueError):
    """Unreadable or malformed training data; the message names the file, row or column."""


@dataclass(kw_only=True)
class BatchFields:
    """What every batch carries besides its images, one entry per item (pair or image; keyword-only)."""

    prompt_embeds: Tensor | None = None  # float (B, L, D) cached text hidden states (after dropout)
    pooled_prompt_embeds: Tensor | None = None  # float (B, D2), SDXL only
    original_sizes: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))  # (B, 2) h, w
    crop_top_left: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))  # (B, 2) top, left
    indices: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (B,) item ids

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class PairBatch(BatchFields):
    """B preference pairs; every two-image tensor is stacked winners first, then losers.

    Exactly one of (winners, losers) or latents is set. Pixels are uint8; the
    trainer normalizes them on the device.
    """

    captions: list[str]
    winners: Tensor | None = None  # uint8 (B, 3, H, W)
    losers: Tensor | None = None  # uint8 (B, 3, H, W)
    latents: Tensor | None = None  # float (2B, 2, C, h, w): posterior (mean, logvar), winners then losers

    def __post_init__(self) -> None:
        has_pixels = self.winners is not None and self.losers is not None
        if has_pixels == (self.latents is not None):
            raise ValueError("PairBatch needs either winners and losers pixels or cached latents, not both")
        if has_pixels and self.winners.shape != self.losers.shape:
            raise ValueError(f"winners {tuple(self.winners.shape)} and losers {tuple(self.losers.shape)} differ")

    def pixels(self) -> Tensor:
        """uint8 (2B, 3, H, W): the images to encode, winners then losers."""
        return torch.cat([self.winners, self.losers])


@dataclass
class UnpairedBatch(BatchFields):
    """N single images with binary feedback (Diffusion-KTO's input): each is desirable or not.

    Exactly one of ``images`` or ``latents`` is set; the :class:`BatchFields` have one entry per image
    (``indices`` are row ids of the unpaired data set).
    """

    captions: list[str]
    desirable: Tensor  # bool (N,)
    images: Tensor | None = None  # uint8 (N, 3, H, W)
    latents: Tensor | None = None  # float (N, 2, C, h, w): posterior (mean, logvar)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.latents is None):
            raise ValueError("UnpairedBatch needs either images or cached latents, not both")
        if self.desirable.dtype != torch.bool or self.desirable.shape != (len(self.captions),):
            raise ValueError(f"desirable must be bool ({len(self.captions)},); got {self.desirable.dtype} "
                             f"{tuple(self.desirable.shape)}")

    def pixels(self) -> Tensor:
        """uint8 (N, 3, H, W): the images to encode."""
        return self.images


Batch = PairBatch | UnpairedBatch


def vae_posterior(vae: torch.nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior (mean, logvar) of uint8 pixels (N, 3, H, W): normalized to [-1, 1] on the VAE's device and
    dtype, then encoded. The one pixel encoding of the trainer and the latent cache writer."""
    x = pixels.to(vae.device, vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar
