"""The backend-neutral batches every loader yields (torch Dataset, Rust loader, latent cache): B items of R
images with R labels (:mod:`ncp.data.items`), built by :func:`item_batch`: preference pairs (R = 2,
:class:`PairBatch`) or unpaired images with binary labels (R = 1, :class:`UnpairedBatch`)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

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

    roles: ClassVar[int]  # R: the images of one item

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

    roles: ClassVar[int] = 2

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

    roles: ClassVar[int] = 1

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
BATCHES: dict[int, type[PairBatch] | type[UnpairedBatch]] = {cls.roles: cls for cls in (PairBatch, UnpairedBatch)}


def item_batch(labels: Tensor, images: Sequence[Tensor] | None = None, latents: Tensor | None = None,
               **fields: Any) -> Batch:
    """The batch of B items of R images: ``labels`` bool (B, R), desirable or not, in role order (a pair's
    winner first); ``images`` one uint8 (B, 3, H, W) per role, or ``latents`` (R B, 2, C, h, w), role after
    role; ``fields`` the :class:`BatchFields` and ``captions``. R = 2: a :class:`PairBatch`, R = 1: an
    :class:`UnpairedBatch` (its ``desirable`` the labels)."""
    roles = labels.shape[1]
    if roles not in BATCHES:
        raise ValueError(f"an item has 1 or 2 images; got labels of {roles}")
    if images is not None and len(images) != roles:
        raise ValueError(f"{roles} labels per item but {len(images)} images")
    if roles == 1:
        return UnpairedBatch(desirable=labels[:, 0], images=None if images is None else images[0], latents=latents,
                             **fields)
    if not (labels[:, 0].all() and not labels[:, 1].any()):
        raise ValueError("a pair's images come winner first: labels must be (True, False)")
    winners, losers = (None, None) if images is None else images
    return PairBatch(winners=winners, losers=losers, latents=latents, **fields)


def pair_labels(n: int) -> Tensor:
    """bool (n, 2): the labels of n pairs in role order, the winner then the loser."""
    return torch.tensor([[True, False]]).expand(n, 2)


def vae_posterior(vae: torch.nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior (mean, logvar) of uint8 pixels (N, 3, H, W): normalized to [-1, 1] on the VAE's device and
    dtype, then encoded. The one pixel encoding of the trainer and the latent cache writer."""
    x = pixels.to(vae.device, vae.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.logvar
