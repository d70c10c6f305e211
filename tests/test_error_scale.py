"""objective.error_scale: the paper's errors or their logs (docs/error_scale.md)."""
import dataclasses
import json
import math

import pytest
import torch

from ncp.objectives import OBJECTIVES, cpo_loss, dpo_loss
from ncp.step import preference_step, sample_noise, scale_errors

from fixtures import cli_args, criterion_of, overrides_of


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_paper_is_identity():
    err = t(0.2, 1e-7, 3.0)
    assert scale_errors(err, "paper") is err


def test_log_dpo_hand_computed():
    """err_w=0.2, err_l=0.4, ref_w=ref_l=0.25, beta=2, log scale:
    d_theta - d_ref = (ln 0.2 - ln 0.4) - (ln 0.25 - ln 0.25) = ln 0.5,
    logit = -2/2 * ln 0.5 = ln 2 = 0.693147181, loss = log(1 + 1/2) = 0.405465108."""
    e = [scale_errors(x, "log") for x in (t(0.2), t(0.4), t(0.25), t(0.25))]
    out = dpo_loss(*e, beta=2.0)
    assert out.logits.item() == pytest.approx(math.log(2), abs=1e-12)
    assert out.loss.item() == pytest.approx(0.405465108, abs=1e-9)


def test_log_cpo_hand_computed():
    """err_w=0.1, err_l=0.3, beta_cpo=2, lambda=0.5, log scale: logit = -(ln 0.1 - ln 0.3) = ln 3,
    loss = log(1 + 1/3) + 0.5 ln 0.1 = 0.287682072 - 1.151292546 = -0.863610474."""
    out = cpo_loss(scale_errors(t(0.1), "log"), scale_errors(t(0.3), "log"), beta_cpo=2.0, cpo_lambda=0.5)
    assert out.logits.item() == pytest.approx(math.log(3), abs=1e-12)
    assert out.loss.item() == pytest.approx(-0.863610474, abs=1e-9)


def test_log_logits_do_not_depend_on_the_error_scale():
    """What the log form is for: errors c times larger (another timestep, another image) give the same
    logit, where the paper's logit grows c times."""
    err = [t(0.2, 2e-6), t(0.4, 3e-6), t(0.25, 2.5e-6), t(0.3, 2e-6)]
    for c in (1e-4, 1.0, 1e3):
        log_logit = dpo_loss(*[scale_errors(c * e, "log") for e in err], beta=10.0).logits
        torch.testing.assert_close(log_logit, dpo_loss(*[scale_errors(e, "log") for e in err], beta=10.0).logits)
    paper = dpo_loss(*[1e3 * e for e in err], beta=10.0).logits
    torch.testing.assert_close(paper, 1e3 * dpo_loss(*err, beta=10.0).logits)


def test_log_of_zero_is_finite_and_unknown_scale_is_named():
    assert torch.isfinite(scale_errors(t(0.0), "log")).all()
    with pytest.raises(ValueError, match="objective.error_scale.*'linear'"):
        scale_errors(t(1.0), "linear")


@pytest.mark.parametrize("objective", ["ncp-dpo", "dpo", "ncp-cpo"])
def test_step_with_log_scale_is_the_loss_of_log_errors(objective, tiny_sd15):
    """preference_step(error_scale=log): metrics keep the raw errors, the loss is the objective applied to their
    logs."""
    from fixtures import step_inputs_with_lora

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    kwargs = {"beta": 50.0} if objective.endswith("dpo") else {"beta_cpo": 50.0, "cpo_lambda": 1.0}
    outs = {}
    for scale in ("paper", "log"):
        noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
        criterion = criterion_of(objective, schedule, error_scale=scale, **kwargs)
        outs[scale] = preference_step(criterion, models.unet, models.unet, x0, cond, noise)
    paper, log = outs["paper"].metrics, outs["log"].metrics
    assert paper["err/policy_winner"] == log["err/policy_winner"]  # raw errors in the metrics
    # the same noise again: the per-image errors, through the log, into the objective by hand
    noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    from ncp.step import branch_errors

    with torch.no_grad():
        err, ref = branch_errors(criterion, models.unet, models.unet, x0, cond, noise)
    scaled = [e.log() if e is not None else None for e in (err[:2], err[2:], *(ref.split(2) if ref is not None
                                                                              else (None, None)))]
    expected = OBJECTIVES[objective].loss(*scaled, **kwargs).loss.mean()
    torch.testing.assert_close(outs["log"].loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert float(paper["loss"]) != pytest.approx(float(outs["log"].loss.detach()))


def test_cli_trains_with_log_scale(tiny_sd15, tiny_parquet, tmp_path):
    from ncp.train import main

    out = tmp_path / "run"
    args = cli_args(tiny_sd15, tiny_parquet, out, "train.max_steps=2", "optim.lr=1e-3", "objective.name=ncp-dpo",
                    "objective.beta=100", "objective.error_scale=log")
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(x["loss"]) for x in lines)
    assert main(args + ["objective.error_scale=cube"]) == 2  # a named config error, not a traceback


# ---------------------------------------------------------------- error_scale=log_t


def test_log_t_weights_each_image_hand_computed():
    """log_t = w * log E: errors (e, e^2) with weights (2, 0.5) give (2, 1), whatever e is; no weights is an error."""
    e = math.e
    torch.testing.assert_close(scale_errors(t(e, e * e), "log_t", t(2.0, 0.5)), t(2.0, 1.0))
    with pytest.raises(ValueError, match="log_t needs the per-image timestep weights"):
        scale_errors(t(1.0), "log_t")


def test_log_t_dpo_logit_is_the_log_logit_times_w():
    """A pair shares its t, so DPO's logit under log_t is w(t) times the log form's: (0.2, 0.4, 0.25, 0.25) at
    beta 2 gives ln 2 (test_log_dpo_hand_computed), at w = 3 it gives 3 ln 2."""
    w = t(3.0)
    out = dpo_loss(*[scale_errors(x, "log_t", w) for x in (t(0.2), t(0.4), t(0.25), t(0.25))], beta=2.0)
    assert out.logits.item() == pytest.approx(3 * math.log(2), abs=1e-12)


def test_timestep_table_hand_computed():
    """Medians 1 at t=1 and 4 at t=3, T=5: log-linear between (w(2) = sqrt(1 * 4) = 2), constant beyond the
    ends: (1, 1, 2, 4, 4), mean 2.4, so the table is (1, 1, 2, 4, 4) / 2.4."""
    from ncp.timestep_scale import table_from_medians

    table = table_from_medians([1, 3], [1.0, 4.0], 5)
    torch.testing.assert_close(table, torch.tensor([1, 1, 2, 4, 4]) / 2.4)
    assert table.mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"positive, finite median errors; got \[\(3, 0.0\)\]"):
        table_from_medians([1, 3], [1.0, 0.0], 5)


def test_calibration_timesteps():
    from ncp.timestep_scale import calibration_timesteps

    grid = calibration_timesteps(1000)
    assert grid[:4] == [1, 50, 100, 150] and grid[-1] == 999 and len(grid) == 21
    assert calibration_timesteps(10, points=21) == list(range(1, 10))  # duplicates merged, t >= 1


def test_step_with_log_t_is_the_loss_of_weighted_log_errors(tiny_sd15):
    """preference_step(error_scale=log_t): each image's log error times its pair's w(t) into the objective."""
    from fixtures import step_inputs_with_lora
    from ncp.step import branch_errors

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    table = torch.linspace(0.5, 1.5, 1000)
    noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    criterion = dataclasses.replace(criterion_of("ncp-dpo", schedule, beta=50.0, error_scale="log_t"),
                                    timestep_table=table)
    out = preference_step(criterion, models.unet, models.unet, x0, cond, noise)
    with torch.no_grad():
        err, ref = branch_errors(criterion, models.unet, models.unet, x0, cond, noise)
    w = table[noise.t]
    expected = dpo_loss(w * err[:2].log(), w * err[2:].log(), w * ref[:2].log(), w * ref[2:].log(), beta=50.0)
    torch.testing.assert_close(out.loss.detach(), expected.loss.mean(), rtol=1e-5, atol=1e-7)
    uncalibrated = dataclasses.replace(criterion, timestep_table=None)
    assert uncalibrated.needs_calibration and not criterion.needs_calibration
    with pytest.raises(ValueError, match="log_t needs"):
        preference_step(uncalibrated, models.unet, models.unet, x0, cond, noise)


def test_cli_log_t_calibrates_the_same_table_on_every_start(tiny_sd15, tiny_parquet, tmp_path):
    """The table depends on the model, the first batch and the seed only: setup twice gives the same table
    (a resume computes it again), positive with mean 1; the CLI trains with it."""
    from ncp.config import load_config
    from ncp.train import main
    from ncp.trainer import setup

    args = cli_args(tiny_sd15, tiny_parquet, tmp_path / "run", "train.max_steps=2", "optim.lr=1e-3",
                    "objective.name=ncp-dpo", "objective.beta=100", "objective.error_scale=log_t")
    tables = [setup(load_config(None, overrides_of(args))).criterion.timestep_table for _ in range(2)]
    assert tables[0].shape == (1000,) and torch.equal(tables[0], tables[1])
    assert (tables[0] > 0).all() and tables[0].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(math.isfinite(x["loss"]) for x in lines)
