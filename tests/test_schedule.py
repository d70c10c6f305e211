"""The reverse step against diffusers' DDPMScheduler.step, and the v-prediction conversions."""
import pytest
import torch
from diffusers import DDPMScheduler

from ncp import ops
from ncp.schedule import NoiseSchedule


@pytest.mark.parametrize("t_value", [1, 2, 17, 500, 999])
def test_reverse_step_equals_ddpm_scheduler_step(t_value):
    """Our fp32 step equals ``DDPMScheduler.step`` (fixed_small, same z) within 1e-5.

    diffusers is run in float64 (schedule and inputs): its fp32 route through the
    predicted x0 loses ~2e-5 to cancellation at t = 1 (abar ~ 1), while the
    direct posterior form used here stays within 3e-7 of float64.
    """
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(1000)  # so the previous timestep of t is t - 1
    schedule = NoiseSchedule.from_scheduler(sched, torch.device("cpu"))
    for name in ("betas", "alphas", "alphas_cumprod"):  # the oracle runs entirely in float64
        setattr(sched, name, getattr(sched, name).double())
    g = torch.Generator().manual_seed(t_value)
    x_t, eps = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(2))
    # diffusers draws its noise from the generator it is given: the same seed gives the same z
    seeded = lambda i: torch.Generator().manual_seed(100 + i)  # noqa: E731
    z = torch.cat([torch.randn(1, 4, 8, 8, generator=seeded(i), dtype=torch.float64) for i in range(2)])
    t = torch.full((2,), t_value)
    ours, others = ops.reverse_step(x_t, eps, eps[None], z.float(), schedule.reverse_coefficients(t))
    assert ours.dtype == torch.float32 and torch.equal(ours, others[0])
    theirs = torch.cat([sched.step(eps[i:i + 1].double(), t_value, x_t[i:i + 1].double(),
                                   generator=seeded(i)).prev_sample for i in range(2)])
    assert (ours.double() - theirs).abs().max().item() < 1e-5


def test_reverse_step_rejects_t0():
    sched = DDPMScheduler()
    with pytest.raises(ValueError, match="t >= 1"):
        NoiseSchedule.from_scheduler(sched, torch.device("cpu")).reverse_coefficients(torch.tensor([0, 3]))


def test_v_prediction_round_trip():
    """v from (x0, eps), then eps back from (v, x_t): identical to the noise; matches diffusers' get_velocity."""
    sched = DDPMScheduler(prediction_type="v_prediction")
    schedule = NoiseSchedule.from_scheduler(sched, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([5, 300, 990])
    v = schedule.velocity(x0, eps, t)
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-6)
    x_t = schedule.add_noise(x0, eps, t)
    assert torch.allclose(x_t, sched.add_noise(x0, eps, t), atol=1e-6)
    assert torch.allclose(schedule.to_epsilon(v, x_t, t), eps, atol=1e-5)
    assert torch.equal(schedule.target(x0, eps, t), v)
