"""ncp.schedule.FlowSchedule (SD3 / Flux flow matching) against diffusers' FlowMatchEulerDiscreteScheduler."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ncp.schedule import FlowSchedule  # noqa: E402


def scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noising_and_euler_step_match_diffusers(shift):
    sched = FlowSchedule.from_scheduler(scheduler(shift), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).float() for _ in range(3))
    for i in (0, 1, 250, 777, 998, 999):
        idx = torch.tensor([i])
        ref = scheduler(shift)
        t = ref.timesteps[i]
        torch.testing.assert_close(sched.timesteps(idx), t.reshape(1))
        torch.testing.assert_close(sched.add_noise(x0, eps, idx), ref.scale_noise(x0, t.reshape(1), eps))
        if i < 999:  # diffusers' training grid has no sigma after its last (its step would index past the end)
            x = sched.add_noise(x0, eps, idx)
            torch.testing.assert_close(sched.euler_step(x, v, idx), ref.step(v, t, x).prev_sample)


def test_hand_computed_quantities():
    sched = FlowSchedule(torch.tensor([1.0, 0.75, 0.5, 0.25]), num_train_timesteps=4)
    idx = torch.tensor([1, 3])
    x0, eps = torch.full((2, 1), 2.0), torch.full((2, 1), -1.0)
    # x = (1 - s) x0 + s eps: s = 0.75 -> 0.5 - 0.75 = -0.25; s = 0.25 -> 1.5 - 0.25 = 1.25
    torch.testing.assert_close(sched.add_noise(x0, eps, idx), torch.tensor([[-0.25], [1.25]]))
    torch.testing.assert_close(sched.target(x0, eps, idx), torch.full((2, 1), -3.0))
    torch.testing.assert_close(sched.step_coefficient(idx), torch.tensor([0.25, 0.25]))  # 0.75-0.5, 0.25-0
    # the Euler step of the true velocity lands on the next sigma's point exactly (the paths are straight):
    # from sigma 0.75 on x at sigma 0.5 = 0.5 * 2 + 0.5 * -1 = 0.5; from the last sigma (0.25) on x0 = 2
    x = sched.add_noise(x0, eps, idx)
    torch.testing.assert_close(sched.euler_step(x, eps - x0, idx), torch.tensor([[0.5], [2.0]]))
    torch.testing.assert_close(sched.timesteps(idx), torch.tensor([3.0, 1.0]))


def test_sigma_sampling_densities():
    sched = FlowSchedule.from_scheduler(scheduler(1.0), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n = 200_000
    lg = sched.sample_indices(n, g, "logit_normal", mean=0.0, std=1.0)
    uni = sched.sample_indices(n, g, "uniform")
    assert lg.min() >= 0 and lg.max() <= 999 and uni.min() >= 0 and uni.max() <= 999
    # logit-normal(0, 1) puts P(|z| < logit(0.6) = 0.405) = 0.3146 of u in (0.4, 0.6), i.e. of the indices in
    # [0.4 T, 0.6 T); uniform puts 20 % there
    mid = lambda ix: ((ix >= 400) & (ix < 600)).float().mean().item()  # noqa: E731
    assert mid(lg) == pytest.approx(0.3146, abs=0.005) and mid(uni) == pytest.approx(0.2, abs=0.005)
    with pytest.raises(ValueError, match="sigma sampling 'cosine'"):
        sched.sample_indices(2, g, "cosine")
    s = scheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="before set_timesteps"):
        FlowSchedule.from_scheduler(s, torch.device("cpu"))
