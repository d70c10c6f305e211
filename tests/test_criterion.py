"""ncp.criterion.Criterion: what it bundles, what it refuses, and the step's signature it replaces."""
import inspect

import pytest
import torch

from ncp.config import ConfigError, ObjectiveConfig
from ncp.criterion import Criterion
from ncp.models import ConcatenatedTaps
from ncp.objectives import OBJECTIVES
from ncp.schedule import NoiseSchedule
from ncp.step import preference_step
from ncp.timestep_scale import calibrated

T = 10
SCHEDULE = NoiseSchedule(torch.full((T,), 0.1), torch.cumprod(torch.full((T,), 0.9), 0), "epsilon")


def test_preference_step_takes_at_most_seven_parameters():
    assert len(inspect.signature(preference_step).parameters) <= 7


def test_from_config_reads_only_its_objectives_hyperparameters():
    cfg = ObjectiveConfig(name="dpo", beta=123.0, beta_kto=9.0)
    c = Criterion.from_config(cfg, SCHEDULE, "sd15", 4)
    assert dict(c.hyperparameters) == {"beta": 123.0}
    assert c.taps == () and c.tap_weights == [] and c.encoder_dtype is None and c.space == "latent"
    mapo = Criterion.from_config(ObjectiveConfig(name="mapo"), SCHEDULE, "sd15", 4)
    assert mapo.hyperparameters["num_timesteps"] == T  # the step's argument, from the schedule
    assert not mapo.needs_reference and mapo.needs_losers


def test_perceptual_taps_and_weights():
    auto = Criterion.from_config(ObjectiveConfig(name="ncp-dpo"), SCHEDULE, "sd15", 4, torch.float32)
    assert auto.taps == ("mid",) and auto.tap_weights == [1.0] and auto.encoder_dtype == torch.float32
    xl = Criterion.from_config(ObjectiveConfig(name="ncp-dpo"), SCHEDULE, "sdxl", 3)
    assert xl.taps == (2,)  # auto = paper for SDXL: the last down block
    multi = Criterion.make("ncp-kto", SCHEDULE, taps=["multiscale"])
    assert multi.taps == (0, 1, 2, 3, "mid") and multi.tap_weights == [0.2] * 5 and multi.per_image
    authors = Criterion.make("ncp-dpo", SCHEDULE, taps=["authors"], tap_normalize=False)
    assert authors.taps == ("conv_in", 0, 1, 2, 3, "mid") and authors.tap_weights == ConcatenatedTaps(False)
    with pytest.raises(ConfigError, match="conv_out"):
        Criterion.make("ncp-dpo", SCHEDULE, taps=["conv_out"])


def test_error_scale_tables():
    coef = Criterion.make("ncp-dpo", SCHEDULE, error_scale="coef")
    # c_e = beta / (sqrt(1 - abar) sqrt(alpha)); at t = 0: 0.1 / (sqrt(0.1) sqrt(0.9)) = 1/3, so 1/c_e^2 = 9
    assert coef.timestep_table[0].item() == pytest.approx(9.0, rel=1e-6)
    assert not coef.needs_calibration
    w = coef.image_weights(torch.tensor([0, 0]), 4)  # two pairs: winners then losers share their pair's t
    assert w.shape == (4,) and torch.allclose(w, torch.full((4,), 9.0))
    log_t = Criterion.make("ncp-dpo", SCHEDULE, error_scale="log_t")
    assert log_t.needs_calibration and log_t.image_weights(torch.tensor([1]), 2) is None
    paper = Criterion.make("dpo", SCHEDULE)
    assert calibrated(paper, None, None, None, None, None) is paper  # nothing to measure


def test_make_refuses_what_the_objective_does_not_read():
    with pytest.raises(ValueError, match=r"kto does not read beta \(read by dpo, ncp-dpo\)"):
        Criterion.make("kto", SCHEDULE, beta=5.0)
    with pytest.raises(ValueError, match="taps"):
        Criterion.make("dpo", SCHEDULE, taps=["mid"])
    with pytest.raises(TypeError, match="betta"):
        Criterion.make("dpo", SCHEDULE, betta=5.0)
    with pytest.raises(ConfigError, match="objective.name='dpoo'"):
        Criterion.from_config(ObjectiveConfig(name="dpoo"), SCHEDULE, "sd15", 4)


def test_every_objective_builds():
    for name, objective in OBJECTIVES.items():
        c = Criterion.make(name, SCHEDULE)
        assert c.objective is objective and c.name == name
        assert set(c.hyperparameters) == set(objective.keyword_arguments)
