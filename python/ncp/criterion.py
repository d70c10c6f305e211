"""``Criterion``: the objective as a step applies it, built once (docs/internals.md).

It owns what turns a batch's branch errors into a loss: the objective (its pure loss function and the
branches it needs), its hyperparameters, the space (latent or perceptual), the encoder taps and their
weights, the error scale and its per-timestep table, and the perceptual encoder's precision. The step
(``ncp.step.preference_step``), the FLOP counter, the ``log_t`` calibration, the study benchmarks and the
tests all take this one object instead of the dozen values it bundles.

Built from the config (``Criterion.from_config``) or by name (``Criterion.make``, for benchmarks and tests,
which refuses a hyperparameter the objective does not read, naming the objectives that do).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ncp.config import ConfigError, ObjectiveConfig, unread_objective_keys
from ncp.models import ConcatenatedTaps, Tap, TapWeights, resolve_taps
from ncp.objectives import OBJECTIVES, Objective
from ncp.schedule import Schedule

ERROR_SCALES = ("paper", "coef", "log", "log_t")


@dataclass(frozen=True)
class Criterion:
    name: str  # the objective's name: dpo, ncp-dpo, kto, ...
    objective: Objective
    hyperparameters: Mapping[str, Any]  # the loss's keyword arguments, ``num_timesteps`` included where it reads it
    schedule: Schedule  # DDPM or flow (``ncp.schedule``), as the model's family trains
    taps: tuple[Tap, ...] = ()  # the perceptual encoder's taps (empty for latent objectives)
    tap_weights: TapWeights = field(default_factory=list)  # one weight per tap, or ConcatenatedTaps (taps=authors)
    error_scale: str = "paper"  # objective.error_scale (docs/error_scale.md)
    timestep_table: Tensor | None = None  # (T,) w(t): 1 / c_e(t)^2 for coef, calibrated for log_t
    encoder_dtype: torch.dtype | None = None  # model.perceptual_precision (None: the policy's precision)
    kind: str = "sd15"  # the model family (``ncp.families``): how the step calls the denoiser and its encoder

    # ------------------------------------------------------------ what the objective needs

    @property
    def space(self) -> str:
        return self.objective.space

    @property
    def perceptual(self) -> bool:
        return self.objective.space == "perceptual"

    @property
    def needs_reference(self) -> bool:
        return self.objective.needs_reference

    @property
    def needs_losers(self) -> bool:
        return self.objective.needs_losers

    @property
    def per_image(self) -> bool:
        return self.objective.per_image

    @property
    def needs_calibration(self) -> bool:
        """``error_scale=log_t`` before its table is measured (``ncp.timestep_scale.calibrated``)."""
        return self.error_scale == "log_t" and self.timestep_table is None

    def image_weights(self, t: Tensor, images: int) -> Tensor | None:
        """Each image's ``w(t)`` from the table (None without one): ``t`` holds one timestep per pair (or per
        unpaired image), repeated for the ``images // len(t)`` images that share it."""
        if self.timestep_table is None:
            return None
        w = self.timestep_table[t]
        return w.repeat(images // t.shape[0])

    # ------------------------------------------------------------ building

    @classmethod
    def from_config(cls, objective: ObjectiveConfig, schedule: Schedule, kind: str, num_down_blocks: int,
                    encoder_dtype: torch.dtype | None = None) -> "Criterion":
        """The criterion of ``cfg.objective`` for a model of family ``kind`` whose denoiser has
        ``num_down_blocks`` tappable blocks (``Family.tap_units``: U-Net down blocks, transformer blocks).
        ``error_scale=log_t`` needs ``ncp.timestep_scale.calibrated`` before the first step."""
        if objective.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={objective.name!r} is not one of {', '.join(OBJECTIVES)}")
        if objective.error_scale not in ERROR_SCALES:
            raise ConfigError(f"objective.error_scale must be one of {', '.join(ERROR_SCALES)}; "
                              f"got {objective.error_scale!r}")
        obj = OBJECTIVES[objective.name]
        hyper = obj.loss_kwargs(objective)
        if "num_timesteps" in obj.keyword_arguments:
            hyper["num_timesteps"] = schedule.num_timesteps
        taps: tuple[Tap, ...] = ()
        weights: TapWeights = []
        if obj.space == "perceptual":
            try:
                taps = tuple(resolve_taps(objective.taps, kind, num_down_blocks))
            except ValueError as err:  # an unknown tap name: a config error, not a traceback
                raise ConfigError(str(err)) from err
            weights = _tap_weights(objective, len(taps))
        table = schedule.noise_coefficient_table() if objective.error_scale == "coef" else None
        return cls(objective.name, obj, hyper, schedule, taps, weights, objective.error_scale, table,
                   encoder_dtype if obj.space == "perceptual" else None, kind)

    @classmethod
    def make(cls, name: str, schedule: Schedule, *, kind: str = "sd15", num_down_blocks: int = 4,
             encoder_dtype: torch.dtype | None = None, **fields: Any) -> "Criterion":
        """The criterion of objective ``name`` with ``fields`` (``ObjectiveConfig`` fields: hyperparameters,
        ``taps``, ``tap_weights``, ``error_scale``...) over the config's defaults. A hyperparameter ``name``
        does not read is an error naming the objectives that read it."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ObjectiveConfig)})
        if unknown:
            raise TypeError(f"Criterion.make: {', '.join(unknown)} not objective settings (ObjectiveConfig)")
        unread = unread_objective_keys(name, [f"objective.{k}" for k in fields])
        if unread:
            listed = "; ".join(f"{k.removeprefix('objective.')} (read by {who})" for k, who in unread.items())
            raise ValueError(f"objective {name} does not read {listed}")
        if "taps" in fields:
            fields["taps"] = [str(t) for t in fields["taps"]]
        return cls.from_config(ObjectiveConfig(name=name, **fields), schedule, kind, num_down_blocks,
                               encoder_dtype)


def _tap_weights(objective: ObjectiveConfig, num_taps: int) -> TapWeights:
    """The NCP authors' concatenation for ``taps=authors``, else ``tap_weights`` or equal weights."""
    if objective.taps == ["authors"]:
        return ConcatenatedTaps(normalize=objective.tap_normalize is not False)
    return list(objective.tap_weights) if objective.tap_weights else [1.0 / num_taps] * num_taps
