"""The six objectives as pure loss functions of per-sample errors (METHOD.md, "Objectives").

Each loss takes the per-image errors of the policy and (where used) the
reference, for winners and losers, and returns the per-pair loss and the
per-pair preference logit (None for SFT). The latent objectives get
``ERR = mean (e - eps)^2``, the NCP objectives the perceptual error ``PL``;
the formulas are the same, so one function serves both spaces.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # (B,) per pair
    logits: Optional[Tensor]  # (B,) preference logit, > 0 means the winner is preferred


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float, **_: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14 as in its official code).

    ``-logsigmoid(-beta/2 * ((err_w - err_l) - (ref_w - ref_l)))``.
    """
    logits = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return LossOutput(-F.logsigmoid(logits), logits)


def cpo_loss(
    err_w: Tensor, err_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None, *,
    beta_cpo: float, cpo_lambda: float, **_: float,
) -> LossOutput:
    """CPO (Xu et al. 2024) for diffusion, NCP paper Eq. 15: no reference model.

    ``-logsigmoid(-beta_cpo/2 * (err_w - err_l)) + lambda * err_w``.
    """
    logits = -0.5 * beta_cpo * (err_w - err_l)
    return LossOutput(-F.logsigmoid(logits) + cpo_lambda * err_w, logits)


def sft_loss(err_w: Tensor, err_l: Tensor | None = None, ref_w: Tensor | None = None,
             ref_l: Tensor | None = None, **_: float) -> LossOutput:
    """Supervised fine-tuning on the winners: ``err_w``."""
    return LossOutput(err_w, None)


@dataclass(frozen=True)
class Objective:
    loss: Callable[..., LossOutput]
    space: str  # "latent" or "perceptual"
    needs_reference: bool
    needs_losers: bool


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(sft_loss, "latent", needs_reference=False, needs_losers=False),
    "dpo": Objective(dpo_loss, "latent", needs_reference=True, needs_losers=True),
    "cpo": Objective(cpo_loss, "latent", needs_reference=False, needs_losers=True),
    "ncp-sft": Objective(sft_loss, "perceptual", needs_reference=False, needs_losers=False),
    "ncp-dpo": Objective(dpo_loss, "perceptual", needs_reference=True, needs_losers=True),
    "ncp-cpo": Objective(cpo_loss, "perceptual", needs_reference=False, needs_losers=True),
}
