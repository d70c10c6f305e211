"""DDPM schedule quantities for one training step (docs/method.md, "One training step", steps 1-4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NoiseSchedule:
    """The base model's DDPM schedule as fp32 tensors on the training device."""

    betas: Tensor  # (T,)
    alphas_cumprod: Tensor  # (T,)
    prediction_type: str  # "epsilon" or "v_prediction"

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device) -> "NoiseSchedule":
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
        return cls(
            betas=scheduler.betas.to(device=device, dtype=torch.float32),
            alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
            prediction_type=prediction_type,
        )

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def _bcast(self, values: Tensor, like: Tensor) -> Tensor:
        return values.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self._bcast(self.alphas_cumprod[t], x0)
        return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()).to(x0.dtype)

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (the v-prediction target)."""
        abar = self._bcast(self.alphas_cumprod[t], x0)
        return (abar.sqrt() * eps.float() - (1 - abar).sqrt() * x0.float()).to(x0.dtype)

    def to_epsilon(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output as a noise estimate (v-prediction: eps = sqrt(abar) v + sqrt(1 - abar) x_t)."""
        if self.prediction_type == "epsilon":
            return pred
        abar = self._bcast(self.alphas_cumprod[t], pred)
        return (abar.sqrt() * pred.float() + (1 - abar).sqrt() * x_t.float()).to(pred.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model predicts (Diffusion-DPO compares predictions to this in latent space)."""
        return eps if self.prediction_type == "epsilon" else self.velocity(x0, eps, t)

    def reverse_coefficients(self, t: Tensor) -> Tensor:
        """(N, 3) fp32 ``[c_x, c_e, sigma]`` of the DDPM posterior step t -> t-1, "fixed_small" variance.

        ``x_{t-1} = c_x x_t - c_e eps + sigma z`` with ``c_x = 1/sqrt(alpha_t)``,
        ``c_e = beta_t / (sqrt(1 - abar_t) sqrt(alpha_t))`` and
        ``sigma^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t`` (t >= 1).
        """
        if t.device.type == "cpu":
            if bool((t < 1).any()):
                raise ValueError("the reverse step needs t >= 1")
        elif t.device.type == "cuda":  # checked without a host-device sync in the middle of every step
            torch._assert_async((t >= 1).all(), "the reverse step needs t >= 1")
        # (meta tensors, as ncp.flops counts a step on: shapes only, nothing to check)
        beta = self.betas[t]
        alpha = 1 - beta
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t - 1]
        c_x = alpha.rsqrt()
        c_e = beta / ((1 - abar).sqrt() * alpha.sqrt())
        variance = ((1 - abar_prev) / (1 - abar) * beta).clamp(min=1e-20)  # as diffusers' _get_variance
        return torch.stack([c_x, c_e, variance.sqrt()], dim=1)

    def noise_coefficient_table(self) -> Tensor:
        """(T,) fp32 ``1 / c_e(t)^2`` for t in [0, T): ``objective.error_scale=coef``'s per-timestep scale.

        ``c_e(t) = beta_t / (sqrt(1 - abar_t) sqrt(alpha_t))`` is the factor the reverse step puts on the
        noise estimate (``reverse_coefficients``), so ``PL / c_e(t)^2`` measures the perceptual error per unit
        of noise error. Computed in float64 (``1 - abar_t`` is ~1e-3 at t = 1). t = 0 is never drawn.
        """
        beta = self.betas.double()
        abar = self.alphas_cumprod.double()
        c_e = beta / ((1 - abar).sqrt() * (1 - beta).sqrt())
        return c_e.pow(-2).float()
