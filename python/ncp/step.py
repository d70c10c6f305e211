"""One preference step: noise the pairs, run policy / reference, measure errors, apply the objective.

This is docs/method.md's "One training step" as code. Every objective goes through
``preference_step``; they differ only in the pure loss function and in which
branches they need (``ncp.objectives.OBJECTIVES``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ncp import ops
from ncp.criterion import Criterion
from ncp.families import Family, family
from ncp.models import Conditioning, Tap, adapters_disabled, frozen_checkpointing
from ncp.schedule import NoiseSchedule, Schedule


@dataclass
class StepNoise:
    """The randomness of one step, shared by the winner and the loser of each pair."""

    t: Tensor  # (B,) long: DDPM timesteps in [1, T-1], flow sigma indices in [0, T-1]
    eps: Tensor  # (B, C, h, w)
    z: Tensor  # (B, C, h, w) the reverse step's noise (the flow's Euler step adds none)


def sample_noise(batch: int, latent_shape: tuple[int, ...], schedule: Schedule | int,
                 generator: torch.Generator, device: torch.device) -> StepNoise:
    """One step's timesteps, as the schedule draws them (an int ``T``: DDPM's, uniform in [1, T)), and noise."""
    if isinstance(schedule, int):
        t = NoiseSchedule.uniform_timesteps(schedule, batch, generator, device)
    else:
        t = schedule.sample_timesteps(batch, generator)
    eps = torch.randn((batch, *latent_shape), generator=generator, device=device)
    z = torch.randn((batch, *latent_shape), generator=generator, device=device)
    return StepNoise(t, eps, z)


@dataclass
class StepOutput:
    loss: Tensor  # scalar
    metrics: dict[str, Tensor]  # detached scalars


def _pair(x: Tensor, n: int) -> Tensor:
    """Repeat per-pair values for the n stacked images (winners, losers)."""
    return x.repeat(n, *([1] * (x.dim() - 1)))


def frozen_encoder_features(fam: Family, base: nn.Module, x: Tensor, t: Tensor, cond: Conditioning,
                            taps: list[Tap]) -> list[Tensor]:
    """E(x, t, c) with gradients to ``x`` through the frozen base weights (adapters off).

    With gradient checkpointing on, each checkpointed module of the encoder
    recomputes in backward with its adapters switched off again (they are back on
    by then, for the policy): ``frozen_checkpointing``. Peak memory then stays that
    of the policy's own checkpointed pass, not that of the whole encoder's activations.
    """
    with adapters_disabled(base), frozen_checkpointing(base):
        return list(fam.encoder_features(base, x, t, cond, taps))


def encoder_precision(dtype: torch.dtype | None, device: torch.device):
    """The autocast context of the perceptual encoder's passes: none (the surrounding one) for None, autocast
    off for fp32, else autocast to ``dtype`` (fp16 over bf16 weights: autocast casts them per op)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def perceptual_dtype(setting: str, policy_dtype: torch.dtype, weight_dtype: torch.dtype,
                     device: torch.device) -> torch.dtype | None:
    """``model.perceptual_precision`` -> ``branch_errors``' ``encoder_dtype`` (None: the policy's precision;
    ``tf32`` and ``fp32`` both give fp32, ``train.setup`` sets the TF32 switches).

    ``policy_dtype``: what the policy computes in (the autocast dtype, else the frozen weights' dtype). The
    branch difference NCP lives on is ``c_e(t) (e - eps)``, ``c_e(t)`` 0.004-0.02: bf16 rounds it away. The
    LoRA gradient's cosine with float64 on the bundled model (``benchmarks/precision.py``): bf16 0.47-0.61,
    fp16 encoder 0.93-0.95, TF32 (emulated) 0.98, fp32 0.998; so ``auto`` runs the reverse step and the encoder
    in fp32 under a bf16 policy (fp16 where the frozen weights are half precision: fp32 needs fp32 weights)."""
    if setting == "same" or (setting == "auto" and policy_dtype != torch.bfloat16):
        return None
    if setting == "auto":
        setting = "fp32" if weight_dtype == torch.float32 else "fp16"
    if setting in ("fp32", "tf32") and weight_dtype != torch.float32:
        raise ValueError(f"model.perceptual_precision={setting} runs the frozen encoder without autocast: it needs "
                         f"model.weight_dtype=fp32 or auto (the weights are {str(weight_dtype).removeprefix('torch.')})")
    if setting == "fp16" and device.type == "cpu" and weight_dtype == torch.bfloat16:
        raise ValueError("model.perceptual_precision=fp16 over bf16 weights needs CUDA autocast (CPU autocast's "
                         "GroupNorm wants fp32 parameters): use model.weight_dtype=fp32 or auto on the CPU")
    return torch.float16 if setting == "fp16" else torch.float32


def branch_errors(criterion: Criterion, unet: nn.Module, base: nn.Module, x0: Tensor, cond: Conditioning,
                  noise: StepNoise) -> tuple[Tensor, Tensor | None]:
    """Per-image errors of the policy and (if the objective needs it) the reference.

    ``x0``: (nB, C, h, w) latents, winners then losers (n = 1 for SFT); ``cond`` and
    ``noise`` hold one entry per pair (B) and are shared by its images. ``unet`` is
    the (possibly DDP-wrapped) policy; ``base`` the unwrapped module whose
    adapters are switched off for the reference and the perceptual encoder.
    Perceptual objectives: the criterion's taps and tap weights (one per tap, or ``ConcatenatedTaps``: the
    weights from the tapped maps' sizes); with a ``criterion.encoder_dtype`` the reverse step returns fp32 and
    the frozen encoder runs under autocast to that dtype (fp32: no autocast), whatever the policy's precision;
    None: both in the surrounding precision, the reverse step's output in ``x_t``'s dtype
    (``model.perceptual_precision``).
    Returns fp32 (nB,) tensors.
    """
    schedule, taps, encoder_dtype = criterion.schedule, list(criterion.taps), criterion.encoder_dtype
    fam = family(criterion.kind)
    n = x0.shape[0] // noise.t.shape[0]
    t, eps, z = _pair(noise.t, n), _pair(noise.eps, n), _pair(noise.z, n)
    cond = cond.repeat(n)
    x_t = schedule.add_noise(x0, eps.to(x0.dtype), t)  # (nB, C, h, w)
    timestep = schedule.model_timestep(t)
    pred = fam.denoise(unet, x_t, timestep, cond)  # policy, with grad
    ref = None
    if criterion.needs_reference:
        with torch.no_grad(), adapters_disabled(base):
            ref = fam.denoise(base, x_t, timestep, cond)

    if not criterion.perceptual:
        target = schedule.target(x0, eps.to(x0.dtype), t)
        err, err_ref = ops.multiscale_error([pred], [ref] if ref is not None else [], [target], [1.0])
        return err, (err_ref if ref is not None else None)

    # Perceptual: reverse step of every branch to the next lower noise level (DDPM t-1, the flow's next sigma),
    # then the frozen encoder there. The step is linear in the noise estimate (DDPM) or the velocity (flow).
    coef = schedule.reverse_coefficients(t)  # (nB, 3)
    eps_policy = schedule.step_estimate(pred, x_t, t)
    others = [schedule.step_estimate(ref, x_t, t)] if ref is not None else []
    truth = schedule.step_truth(x0, eps, t).to(pred.dtype)
    others = torch.stack([*others, truth])  # (K, nB, C, h, w): [reference,] true noise (or velocity)
    x_in = x_t
    if encoder_dtype is not None:  # the branches differ by c_e(t) (e - eps) only: the reverse step in fp32
        x_in, eps_policy, others = x_t.float(), eps_policy.float(), others.float()
    prev_policy, prev_other = ops.reverse_step(x_in, eps_policy, others, z.to(x_in.dtype), coef)
    k = prev_other.shape[0]
    t_next = schedule.next_model_timestep(t)
    with encoder_precision(encoder_dtype, x_t.device):
        with torch.no_grad(), adapters_disabled(base):
            feats_other = fam.encoder_features(base, prev_other.flatten(0, 1), t_next.repeat(k), cond.repeat(k), taps)
        feats_policy = frozen_encoder_features(fam, base, prev_policy, t_next, cond, taps)
    split = [f.unflatten(0, (k, -1)) for f in feats_other]  # each (K, nB, ...)
    target = [f[-1] for f in split]
    reference = [f[0] for f in split] if ref is not None else []
    weights = criterion.tap_weights
    weights = weights(feats_policy) if callable(weights) else weights
    err, err_ref = ops.multiscale_error(feats_policy, reference, target, weights)
    return err, (err_ref if ref is not None else None)


def scale_errors(err: Tensor, error_scale: str, weight: Tensor | None = None) -> Tensor:
    """The per-image errors as the loss sees them (``objective.error_scale``, docs/error_scale.md).

    - ``paper``: unchanged, ``ERR`` or ``PL`` as Diffusion-DPO and the NCP paper write them.
    - ``coef``: ``weight * PL``, ``weight = 1 / c_e(t)^2`` (``NoiseSchedule.noise_coefficient_table``): the
      reverse step scales the noise error by ``c_e(t)`` before the encoder sees it,
      ``x_{t-1}(e) - x_{t-1}(eps) = -c_e(t) (e - eps)``, so this is the encoder's metric on the noise error
      in noise units. No state, no calibration.
    - ``log``: ``log ERR``. Differences of log errors are log ratios, so a DPO logit
      ``-beta/2 ((log PL_theta(w) - log PL_ref(w)) - (log PL_theta(l) - log PL_ref(l)))``
      no longer carries the error's magnitude, which in the perceptual space swings by
      orders of magnitude across timesteps and across images of one timestep.
      Its gradient is ``grad PL / PL``: each image weighted by its own error's inverse.
    - ``log_t``: ``weight * log ERR``, ``weight`` each image's ``w(t)`` from a table of the
      reference's median error per timestep (``ncp.timestep_scale``): the paper form's emphasis
      across timesteps, without its outliers within one timestep.
    """
    if error_scale == "paper":
        return err
    if error_scale == "coef":
        if weight is None:
            raise ValueError("error_scale=coef needs the per-image 1 / c_e(t)^2 (NoiseSchedule.noise_coefficient_table)")
        return err * weight.to(err.dtype)
    if error_scale in ("log", "log_t"):
        logs = err.clamp_min(torch.finfo(err.dtype).tiny).log()
        if error_scale == "log":
            return logs
        if weight is None:
            raise ValueError("error_scale=log_t needs the per-image timestep weights (ncp.timestep_scale.calibrate)")
        return logs * weight.to(logs.dtype)
    raise ValueError(f"objective.error_scale must be one of paper, coef, log, log_t; got {error_scale!r}")


def preference_step(criterion: Criterion, unet: nn.Module, base: nn.Module, x0: Tensor, cond: Conditioning,
                    noise: StepNoise, desirable: Tensor | None = None) -> StepOutput:
    """Loss and metrics of one micro-batch under ``criterion`` (``ncp.criterion.Criterion``).

    ``x0``: (2B, C, h, w), winners then losers (objectives that do not need losers use the first B rows);
    ``cond``: B prompts. Unpaired data (per-image objectives only): ``x0`` holds N single images,
    ``desirable`` their (N,) bool labels, ``cond`` and ``noise`` one entry per image.
    Metrics report the raw errors; the loss sees them through ``scale_errors``."""
    b = noise.t.shape[0]
    if desirable is not None and not criterion.per_image:
        raise ValueError("unpaired (labelled) images need a per-image objective: kto or ncp-kto")
    if desirable is None and not criterion.needs_losers:
        x0 = x0[:b]  # SFT trains on the winners only
    err, err_ref = branch_errors(criterion, unet, base, x0, cond, noise)
    # (winner rows, loser rows): slices for pairs (no device sync), the labels' masks for unpaired images
    groups = (slice(0, b), slice(b, None)) if desirable is None else (desirable, ~desirable)
    weight = criterion.image_weights(noise.t, err.shape[0])  # pairs share their t, unpaired images have their own
    scaled = [None if e is None else scale_errors(e, criterion.error_scale, weight) for e in (err, err_ref)]
    objective, loss_kwargs = criterion.objective, criterion.hyperparameters
    if objective.per_image:
        if desirable is None:  # pairs: the winners are desirable, the losers not
            desirable = torch.arange(err.shape[0], device=err.device) < b
        out = objective.loss(*scaled, desirable, **loss_kwargs)
    else:  # (B,) winners' and losers' errors
        split = [(None, None) if e is None else (e[:b], e[b:] if objective.needs_losers else None) for e in scaled]
        out = objective.loss(*split[0], *split[1], **loss_kwargs)
    loss = out.loss.mean()
    metrics = {"loss": loss.detach(), **out.metrics, **_error_metrics(err, err_ref, groups)}
    if out.logits is not None:
        logits = out.logits.detach()
        metrics["rewards/accuracy"] = ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()
        metrics["rewards/margin"] = logits.mean()
    return StepOutput(loss, metrics)


def _error_metrics(err: Tensor, err_ref: Tensor | None, groups: tuple) -> dict[str, Tensor]:
    """Mean raw errors of the winners (desirable images) and losers (undesirable), policy and reference;
    a group without images has no entry."""
    metrics = {}
    for branch, e in (("policy", err), ("reference", err_ref)):
        for name, rows in zip(("winner", "loser"), groups):
            picked = None if e is None else e.detach()[rows]
            if picked is not None and picked.numel() > 0:
                metrics[f"err/{branch}_{name}"] = picked.mean()
    return metrics
