"""objective.error_scale: the paper's errors or their logs (docs/error_scale.md)."""
import json
import math

import pytest
import torch

from ncp.objectives import OBJECTIVES, cpo_loss, dpo_loss
from ncp.step import preference_step, sample_noise, scale_errors

from fixtures import cli_args


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
        outs[scale] = preference_step(models.unet, models.unet, schedule, OBJECTIVES[objective], kwargs, x0, cond,
                                      noise, ["mid"], [1.0], error_scale=scale)
    paper, log = outs["paper"].metrics, outs["log"].metrics
    assert paper["err/policy_winner"] == log["err/policy_winner"]  # raw errors in the metrics
    # the same noise again: the per-image errors, through the log, into the objective by hand
    noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    from ncp.step import branch_errors

    with torch.no_grad():
        err, ref = branch_errors(models.unet, models.unet, schedule, OBJECTIVES[objective], x0, cond, noise, ["mid"],
                                 [1.0])
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
