"""The ten objectives as pure loss functions of per-sample errors (docs/objectives.md).

Each loss takes the per-image errors of the policy and (where used) the
reference and returns the loss and a preference logit (> 0: the preferred
direction; None for SFT). The latent objectives get ``ERR = mean (e - eps)^2``,
the NCP objectives the perceptual error ``PL``; the formulas are the same, so
one function serves both spaces.

Two call forms:
- pair losses ``loss(err_w, err_l, ref_w, ref_l, **hyperparameters)`` return one
  value per pair (SFT, DPO, CPO, MaPO);
- per-image losses ``loss(err, ref, desirable, **hyperparameters)`` return one
  value per image (KTO): each image carries its own binary label. Pair data feeds
  them as winners desirable, losers undesirable.

A loss's keyword-only parameters are its hyperparameters: each is a field of
``ncp.config.ObjectiveConfig`` of the same name (``Objective.hyperparameters``),
except ``num_timesteps``, which the step supplies from the noise schedule.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOutput:
    loss: Tensor  # (B,) per pair, or (N,) per image for per-image objectives
    logits: Optional[Tensor]  # same shape; > 0 means the preferred direction (winner / label agrees)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # extra detached scalars, namespaced


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14 as in its official code).

    ``-logsigmoid(-beta/2 * ((err_w - err_l) - (ref_w - ref_l)))``.
    """
    logits = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return LossOutput(-F.logsigmoid(logits), logits)


def cpo_loss(
    err_w: Tensor, err_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None, *,
    beta_cpo: float, cpo_lambda: float,
) -> LossOutput:
    """CPO (Xu et al. 2024) for diffusion, NCP paper Eq. 15: no reference model.

    ``-logsigmoid(-beta_cpo/2 * (err_w - err_l)) + lambda * err_w``.
    """
    logits = -0.5 * beta_cpo * (err_w - err_l)
    return LossOutput(-F.logsigmoid(logits) + cpo_lambda * err_w, logits)


def sft_loss(err_w: Tensor, err_l: Tensor | None = None, ref_w: Tensor | None = None,
             ref_l: Tensor | None = None) -> LossOutput:
    """Supervised fine-tuning on the winners: ``err_w``."""
    return LossOutput(err_w, None)


def _mapo_odds(err: Tensor, snr: float) -> Tensor:
    """MaPO's ``g(x) = s x / (exp(s x) - 1)``, in float64 (``g`` is close to 1 for small errors, and the
    loss takes the difference of two such values), with its limit g(0) = 1."""
    y = snr * err.double()
    zero = y == 0
    y_safe = torch.where(zero, torch.ones_like(y), y)  # no 0/0 in the unused branch (its gradient would be NaN)
    return torch.where(zero, torch.ones_like(y), y_safe / torch.expm1(y_safe))


def mapo_loss(
    err_w: Tensor, err_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None, *,
    beta_mapo: float, mapo_snr: float, mapo_lambda: float, num_timesteps: int,
) -> LossOutput:
    """MaPO (Hong et al. 2024, "Margin-aware Preference Optimization"), as the authors'
    ``compute_loss`` (mapo-t2i/mapo, utils.py): no reference model.

    ``lambda * err_w - beta_mapo * logsigmoid(T * (g(err_w) - g(err_l)))``, ``g(x) = s x / (exp(s x) - 1)``,
    ``s = mapo_snr`` (their ``snr_value``), ``T = num_timesteps``. ``lambda`` is 1 in their code (the
    likelihood term is unweighted); it is a knob here so the NCP space can rescale it like CPO's.
    """
    logits = (num_timesteps * (_mapo_odds(err_w, mapo_snr) - _mapo_odds(err_l, mapo_snr))).to(err_w.dtype)
    ratio = -beta_mapo * F.logsigmoid(logits)
    return LossOutput(mapo_lambda * err_w + ratio, logits, {"loss/mapo_ratio": ratio.detach().mean()})


def kto_loss(err: Tensor, ref: Tensor, desirable: Tensor, *, beta_kto: float, kto_lambda_d: float,
             kto_lambda_u: float) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024), as ``train_kto_sd_v1.5.py`` of jacklishufan/diffusion-kto with its
    defaults (``--loss kto --halo sigmoid --bce_offset none``). Per image:

    reward ``r = ref - err`` (their ``-model_losses - -ref_loss``); reference point
    ``z = max(0, mean_batch r)``, detached (their KL estimate); logit ``sign * beta_kto * (r - z)``
    with sign +1 for desirable, -1 for undesirable images; loss ``lambda * (1 - sigmoid(logit))`` with
    ``lambda = kto_lambda_d`` or ``kto_lambda_u``. No 1/2 in the logit, unlike DPO.
    ``desirable``: (N,) bool. The batch mean for ``z`` is over this process's images (theirs also
    averages it over processes).
    """
    reward = ref - err
    z = reward.detach().mean().clamp(min=0)
    sign = torch.where(desirable, 1.0, -1.0).to(reward.dtype)
    logits = sign * beta_kto * (reward - z)
    weight = torch.where(desirable, kto_lambda_d, kto_lambda_u).to(reward.dtype)
    return LossOutput(weight * (1 - torch.sigmoid(logits)), logits, {"rewards/kto_reference_point": z})


STEP_ARGUMENTS = frozenset({"num_timesteps"})  # keyword arguments the step supplies, not the config


@dataclass(frozen=True)
class Objective:
    loss: Callable[..., LossOutput]
    space: str  # "latent" or "perceptual"
    needs_reference: bool
    needs_losers: bool
    per_image: bool = False  # the loss takes (err, ref, desirable) per image instead of (err_w, err_l, ref_w, ref_l)

    @property
    def keyword_arguments(self) -> tuple[str, ...]:
        params = inspect.signature(self.loss).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The loss's keyword arguments read from ``ObjectiveConfig`` (fields of the same name)."""
        return tuple(n for n in self.keyword_arguments if n not in STEP_ARGUMENTS)

    def loss_kwargs(self, config: Any) -> dict[str, Any]:
        """This objective's hyperparameters, and only those, from an ``ObjectiveConfig``-like object."""
        return {name: getattr(config, name) for name in self.hyperparameters}


def _both(name: str, loss: Callable[..., LossOutput], **needs: bool) -> dict[str, Objective]:
    """``name`` in latent space and ``ncp-name`` in the perceptual space: one loss, two error spaces."""
    return {name: Objective(loss, "latent", **needs), f"ncp-{name}": Objective(loss, "perceptual", **needs)}


OBJECTIVES: dict[str, Objective] = {
    **_both("sft", sft_loss, needs_reference=False, needs_losers=False),
    **_both("dpo", dpo_loss, needs_reference=True, needs_losers=True),
    **_both("cpo", cpo_loss, needs_reference=False, needs_losers=True),
    **_both("mapo", mapo_loss, needs_reference=False, needs_losers=True),
    **_both("kto", kto_loss, needs_reference=True, needs_losers=True, per_image=True),
}
