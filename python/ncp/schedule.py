"""The noise schedules of one training step (docs/method.md, "One training step", steps 1-4): DDPM
(:class:`NoiseSchedule`, the U-Net families) and rectified flow (:class:`FlowSchedule`, SD3 / Flux).

Both answer the step's questions the same way (``ncp.step.branch_errors`` never asks which it has): draw
training timesteps, noise a latent, the prediction target, the model's timestep input, and the reverse step
the perceptual objectives run every branch through, ``x' = c_x x - c_e e + sigma z`` with ``e`` what the step
is linear in (``step_estimate``: the noise estimate for DDPM, the velocity for flow) and the encoder's timestep
input after it (``next_model_timestep``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> Tensor:
        return self.uniform_timesteps(self.num_timesteps, batch, generator, self.betas.device)

    @staticmethod
    def uniform_timesteps(num_timesteps: int, batch: int, generator: torch.Generator,
                          device: torch.device) -> Tensor:
        """Uniform training timesteps in [1, T) (t = 0 has no reverse step)."""
        return torch.randint(1, num_timesteps, (batch,), generator=generator, device=device)

    def model_timestep(self, t: Tensor) -> Tensor:
        """The U-Net's timestep input: t itself."""
        return t

    def next_model_timestep(self, t: Tensor) -> Tensor:
        """Where the reverse step lands, as the encoder's timestep input: t - 1."""
        return t - 1

    def step_estimate(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """What the reverse step is linear in, from a prediction: the noise estimate (``to_epsilon``)."""
        return self.to_epsilon(pred, x_t, t)

    def step_truth(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The true value of ``step_estimate``: the noise."""
        return eps

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


SIGMA_SAMPLING = ("logit_normal", "mode", "uniform")


@dataclass
class FlowSchedule:
    """The rectified-flow (flow matching) schedule of SD3 / SD3.5 and Flux.1, on the training grid of the
    model's ``FlowMatchEulerDiscreteScheduler`` (its sigmas as built, shifted where the config shifts them):
    ``x_sigma = (1 - sigma) x0 + sigma eps``, the model predicts the velocity ``v = eps - x0`` at timestep
    ``1000 sigma``, and the reverse (Euler) step to the next lower sigma is ``x + (sigma_next - sigma) v``.
    Indices count from the noisiest sigma (0) down, as the scheduler's ``timesteps`` do."""

    sigmas: Tensor  # (T,) descending
    num_train_timesteps: int = 1000
    prediction_type: str = "flow"
    weighting: str = "logit_normal"  # the training indices' density (``sample_indices``)

    @classmethod
    def from_scheduler(cls, scheduler, device: torch.device, weighting: str = "logit_normal") -> "FlowSchedule":
        if weighting not in SIGMA_SAMPLING:
            raise ValueError(f"sigma sampling {weighting!r}: expected one of {', '.join(SIGMA_SAMPLING)}")
        n = scheduler.config.num_train_timesteps
        sigmas = scheduler.sigmas[:n].to(device=device, dtype=torch.float32)
        if sigmas.shape[0] != n:
            raise ValueError(f"the scheduler holds {sigmas.shape[0]} sigmas, not its {n} training ones: build the "
                             f"schedule before set_timesteps")
        return cls(sigmas, n, weighting=weighting)

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> Tensor:
        """Training indices by ``weighting`` (``sample_indices``)."""
        return self.sample_indices(batch, generator, self.weighting)

    def model_timestep(self, index: Tensor) -> Tensor:
        return self.timesteps(index)

    def next_model_timestep(self, index: Tensor) -> Tensor:
        """The timestep input at the next lower sigma (0 after the last index)."""
        return self.next_sigma(index) * self.num_train_timesteps

    def step_estimate(self, pred: Tensor, x_t: Tensor, index: Tensor) -> Tensor:
        """The Euler step is linear in the velocity, which the model predicts."""
        return pred

    def step_truth(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        """The true velocity ``eps - x0`` (its Euler step lands on the latent at the next sigma)."""
        return self.target(x0, eps, index)

    def reverse_coefficients(self, index: Tensor) -> Tensor:
        """(N, 3) fp32 ``[c_x, c_e, sigma] = [1, sigma_i - sigma_{i+1}, 0]``: the Euler step
        ``x + (sigma_{i+1} - sigma_i) v`` in the DDPM step's form ``c_x x - c_e v + sigma z`` (no noise), so the
        fused reverse-step op runs it unchanged."""
        c_e = self.step_coefficient(index).float()
        return torch.stack([torch.ones_like(c_e), c_e, torch.zeros_like(c_e)], dim=1)

    def noise_coefficient_table(self) -> Tensor:
        """(T,) fp32 ``1 / (sigma_i - sigma_{i+1})^2``: ``error_scale=coef``'s per-index scale, the Euler step's
        coefficient squared (as the DDPM table's ``c_e(t)^2``), in float64."""
        sig = self.sigmas.double()
        step = sig - torch.cat([sig[1:], sig.new_zeros(1)])
        return step.pow(-2).float()

    def _sigma(self, index: Tensor, like: Tensor) -> Tensor:
        return self.sigmas[index].view(-1, *([1] * (like.dim() - 1)))

    def timesteps(self, index: Tensor) -> Tensor:
        """The transformer's timestep input at each index (``1000 sigma``, as the pipelines pass it)."""
        return self.sigmas[index] * self.num_train_timesteps

    def add_noise(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        s = self._sigma(index, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        """The velocity the model predicts (Flow-DPO compares predictions with it)."""
        return eps - x0

    def next_sigma(self, index: Tensor) -> Tensor:
        nxt = torch.cat([self.sigmas[1:], self.sigmas.new_zeros(1)])
        return nxt[index]

    def euler_step(self, x: Tensor, v: Tensor, index: Tensor) -> Tensor:
        """One Euler step of the velocity ``v`` from sigma[index] to the next lower sigma (0 after the last)."""
        return x + (self.next_sigma(index) - self.sigmas[index]).view(-1, *([1] * (x.dim() - 1))) * v

    def step_coefficient(self, index: Tensor) -> Tensor:
        """``sigma - sigma_next``: two velocities' Euler steps differ by it times their difference (the
        counterpart of the DDPM step's ``c_e(t)``, for ``error_scale=coef``)."""
        return self.sigmas[index] - self.next_sigma(index)

    def sample_indices(self, batch: int, generator: torch.Generator, weighting: str = "logit_normal",
                       mean: float = 0.0, std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
        """Training indices by SD3's density on ``u`` in (0, 1) (``logit_normal``: ``sigmoid(N(mean, std))``;
        ``mode``: the paper's mode sampling; ``uniform``), then ``index = floor(u T)`` on the training grid, as
        diffusers' SD3 / Flux training scripts pick them."""
        device = self.sigmas.device
        if weighting == "logit_normal":
            u = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
        elif weighting == "mode":
            u = torch.rand(batch, generator=generator, device=device)
            u = 1 - u - mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        elif weighting == "uniform":
            u = torch.rand(batch, generator=generator, device=device)
        else:
            raise ValueError(f"sigma sampling {weighting!r}: expected one of {', '.join(SIGMA_SAMPLING)}")
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)


Schedule = Union[NoiseSchedule, FlowSchedule]
