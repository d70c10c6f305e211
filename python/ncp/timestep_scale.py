"""``objective.error_scale=log_t``: log errors weighted by a per-timestep table (docs/error_scale.md).

The log form (``error_scale=log``) makes every logit a log-ratio of errors: scale-free across images and
timesteps alike. That also takes away the paper form's emphasis across timesteps (its gradient
``grad E`` is large where the errors are), which the measurements of issue 15 suggest carries much of the
paper form's signal. ``log_t`` puts that emphasis back, and only that: each image's log error is
multiplied by ``w(t)``, the reference model's *typical* (median) error at the image's timestep, measured
once before training and normalised to a mean of 1 over ``t``. To first order in the policy's deviation,
``w(t) (log E_theta - log E_ref) ~= (E_theta - E_ref) * w(t) / E_ref``: the paper form's difference with each
image's own error magnitude replaced by its timestep's median, so the across-``t`` emphasis stays and the
outliers within one ``t`` (single images with errors far above the median) go.

The table is a pure function of the model, the first batch of the data (epoch 0, this rank) and the
seed: a resumed run computes the same table again and needs no state in its checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch import Tensor

from ncp.criterion import Criterion
from ncp.step import StepNoise, branch_errors

logger = logging.getLogger("ncp.timestep_scale")


def calibration_timesteps(num_timesteps: int, points: int = 21) -> list[int]:
    """``points`` timesteps from 1 to T-1, evenly spaced (1, 50, 100, ..., 999 for T = 1000)."""
    grid = np.linspace(0, num_timesteps - 1, points).round().astype(int)
    return sorted({max(1, int(t)) for t in grid})


def table_from_medians(timesteps: list[int], medians: list[float], num_timesteps: int) -> Tensor:
    """``w(t)`` for every t in [0, T): the medians interpolated linearly in log space over t (constant
    beyond the ends), divided by their mean over t so that a uniform t gives an average weight of 1."""
    m = np.asarray(medians, dtype=np.float64)
    if len(timesteps) != len(m) or len(m) == 0:
        raise ValueError(f"need one median per timestep; got {len(timesteps)} timesteps, {len(m)} medians")
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        bad = [(t, float(v)) for t, v in zip(timesteps, m) if not (np.isfinite(v) and v > 0)]
        raise ValueError(f"error_scale=log_t needs positive, finite median errors; got {bad[:3]} "
                         f"(t, median) from the calibration batch")
    w = np.exp(np.interp(np.arange(num_timesteps), np.asarray(timesteps, dtype=np.float64), np.log(m)))
    return torch.from_numpy(w / w.mean()).float()


def calibrated(criterion: Criterion, unet, base, x0: Tensor, cond, generator: torch.Generator) -> Criterion:
    """``criterion`` with ``log_t``'s table measured on one batch (``calibrate``); itself for every other
    error scale."""
    if criterion.error_scale != "log_t":
        return criterion
    return dataclasses.replace(criterion, timestep_table=calibrate(criterion, unet, base, x0, cond, generator))


@torch.no_grad()
def calibrate(criterion, unet, base, x0: Tensor, cond, generator: torch.Generator, points: int = 21) -> Tensor:
    """The ``(T,)`` weight table of ``log_t``: at each calibration timestep, the median over the batch's
    images of the reference's error (the policy's where the objective has no reference pass), one fixed
    noise draw for all timesteps. ``criterion``: ``ncp.criterion.Criterion`` (its table is what this
    measures); ``x0``: (nB, C, h, w) latents, ``cond`` B prompts."""
    schedule = criterion.schedule
    b = cond.hidden_states.shape[0]
    eps = torch.randn((b, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    z = torch.randn((b, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = calibration_timesteps(schedule.num_timesteps, points)
    medians = []
    for t in timesteps:
        noise = StepNoise(torch.full((b,), t, dtype=torch.long, device=x0.device), eps, z)
        err, ref = branch_errors(criterion, unet, base, x0, cond, noise)
        medians.append(float((ref if ref is not None else err).float().median()))
    table = table_from_medians(timesteps, medians, schedule.num_timesteps).to(x0.device)
    shown = [t for t in (1, 200, 400, 600, 800, schedule.num_timesteps - 1) if t < schedule.num_timesteps]
    logger.info("error_scale=log_t: timestep weights %s (from %d images)",
                ", ".join(f"w({t})={float(table[t]):.3g}" for t in shown), x0.shape[0])
    return table
