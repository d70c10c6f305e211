"""The ten objectives against values worked out by hand."""
import math

import pytest
import torch

from ncp.config import OBJECTIVE_NAMES, ObjectiveConfig
from ncp.objectives import OBJECTIVES, cpo_loss, dpo_loss, kto_loss, mapo_loss, sft_loss


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_dpo_hand_computed():
    """err_w=0.2, err_l=0.3, ref_w=ref_l=0.25, beta=10:
    d_theta = -0.1, d_ref = 0, logit = -10/2 * (-0.1 - 0) = 0.5,
    loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474076984."""
    out = dpo_loss(t(0.2), t(0.3), t(0.25), t(0.25), beta=10.0)
    assert out.logits.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(0.474076984, abs=1e-9)


def test_dpo_subtracts_reference_margin():
    """Same policy errors, reference already prefers the winner by 0.1: d_theta - d_ref = 0,
    logit 0, loss log 2 = 0.693147181."""
    out = dpo_loss(t(0.2), t(0.3), t(0.2), t(0.3), beta=10.0)
    assert out.logits.item() == pytest.approx(0.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_cpo_hand_computed():
    """err_w=0.2, err_l=0.3, beta_cpo=10, lambda=1: logit 0.5, loss 0.474076984 + 1 * 0.2 = 0.674076984;
    no reference is read."""
    out = cpo_loss(t(0.2), t(0.3), None, None, beta_cpo=10.0, cpo_lambda=1.0)
    assert out.loss.item() == pytest.approx(0.674076984, abs=1e-9)
    out = cpo_loss(t(0.2), t(0.3), beta_cpo=10.0, cpo_lambda=0.5)
    assert out.loss.item() == pytest.approx(0.474076984 + 0.1, abs=1e-9)


def test_sft_is_winner_error():
    out = sft_loss(t(0.2, 0.4))
    assert out.loss.tolist() == [0.2, 0.4]
    assert out.logits is None


def test_dpo_gradient_sign():
    """Lowering the winner's error lowers the DPO loss: d loss / d err_w > 0."""
    err_w = t(0.2).requires_grad_()
    dpo_loss(err_w, t(0.3), t(0.25), t(0.25), beta=10.0).loss.sum().backward()
    # d/dx -logsigmoid(-5 (x - 0.3)) at x = 0.2 = 5 * sigmoid(-0.5) = 5 * 0.377540669
    assert err_w.grad.item() == pytest.approx(5 * 0.377540669, abs=1e-8)


def test_mapo_hand_computed():
    """err_w=0.2, err_l=0.4, s=0.5, T=10, beta_mapo=0.1, lambda=1:
    g(0.2) = 0.1 / (e^0.1 - 1) = 0.950833194, g(0.4) = 0.2 / (e^0.2 - 1) = 0.903331113,
    logit = 10 * 0.047502081 = 0.475020813, -logsigmoid(0.475020813) = 0.483581108,
    loss = 0.2 + 0.1 * 0.483581108 = 0.248358111. No reference is read."""
    out = mapo_loss(t(0.2), t(0.4), None, None, beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=1.0, num_timesteps=10)
    assert out.logits.item() == pytest.approx(0.475020813, abs=1e-9)
    assert out.loss.item() == pytest.approx(0.248358111, abs=1e-9)
    assert out.metrics["loss/mapo_ratio"].item() == pytest.approx(0.0483581108, abs=1e-9)
    out = mapo_loss(t(0.2), t(0.4), beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=0.5, num_timesteps=10)
    assert out.loss.item() == pytest.approx(0.1 + 0.0483581108, abs=1e-9)


def test_mapo_gradient():
    """d loss / d err_w = lambda - beta T (1 - sigmoid(logit)) g'(err_w), g'(0.2) = s (e^y - 1 - y e^y) / (e^y - 1)^2
    at y = 0.1 = -0.241669443: 1 + 0.1 * 10 * 0.383434... * 0.241669443 = 1.092662970."""
    err_w = t(0.2).requires_grad_()
    mapo_loss(err_w, t(0.4), beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=1.0, num_timesteps=10).loss.sum().backward()
    assert err_w.grad.item() == pytest.approx(1.092662970, abs=1e-8)


def test_mapo_equal_and_zero_errors():
    """Equal errors: logit 0, loss lambda * err + beta log 2. g(0) = 1 (the limit), with a finite gradient."""
    out = mapo_loss(t(0.3), t(0.3), beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=1.0, num_timesteps=1000)
    assert out.logits.item() == 0.0
    assert out.loss.item() == pytest.approx(0.3 + 0.1 * math.log(2), abs=1e-12)
    err_w = t(0.0).requires_grad_()
    out = mapo_loss(err_w, t(0.0), beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=1.0, num_timesteps=1000)
    out.loss.sum().backward()
    assert out.logits.item() == 0.0 and math.isfinite(err_w.grad.item())


def test_mapo_tiny_errors_in_float32():
    """Perceptual errors are ~1e-7: g is 1 - s x / 2 to first order, so the logit is T s / 2 (err_l - err_w)
    = 1000 * 0.25 * 1e-7 = 2.5e-5; computed in float64 inside the loss it survives float32 inputs."""
    err_w, err_l = torch.tensor([1e-7]), torch.tensor([2e-7])
    out = mapo_loss(err_w, err_l, beta_mapo=0.1, mapo_snr=0.5, mapo_lambda=1.0, num_timesteps=1000)
    assert out.logits.dtype == torch.float32
    assert out.logits.item() == pytest.approx(2.5e-5, rel=1e-5)


def test_kto_hand_computed():
    """err = [0.2 (winner), 0.3 (loser)], ref = 0.25 each, beta 10: rewards r = ref - err = [0.05, -0.05],
    reference point z = max(0, mean r) = 0; logits [+10 * 0.05, -10 * -0.05] = [0.5, 0.5];
    loss 1 - sigmoid(0.5) = 0.377540669 for each image."""
    out = kto_loss(t(0.2, 0.3), t(0.25, 0.25), torch.tensor([True, False]), beta_kto=10.0, kto_lambda_d=1.0,
                   kto_lambda_u=1.0)
    assert out.logits.tolist() == pytest.approx([0.5, 0.5])
    assert out.loss.tolist() == pytest.approx([0.377540669] * 2, abs=1e-9)
    assert out.metrics["rewards/kto_reference_point"].item() == 0.0


def test_kto_reference_point():
    """r = [0.15, 0.05] (err [0.1, 0.2], ref 0.25): z = 0.1, logits [10 * 0.05, -10 * -0.05] = [0.5, 0.5].
    r = [-0.05, -0.15] (err [0.3, 0.4]): mean -0.1 is clamped to z = 0, logits [-0.5, 1.5]; with
    lambda_D = 2, lambda_U = 1: losses [2 (1 - sigmoid(-0.5)), 1 - sigmoid(1.5)] = [1.244918662, 0.182425524]."""
    labels = torch.tensor([True, False])
    out = kto_loss(t(0.1, 0.2), t(0.25, 0.25), labels, beta_kto=10.0, kto_lambda_d=1.0, kto_lambda_u=1.0)
    assert out.metrics["rewards/kto_reference_point"].item() == pytest.approx(0.1)
    assert out.logits.tolist() == pytest.approx([0.5, 0.5])
    out = kto_loss(t(0.3, 0.4), t(0.25, 0.25), labels, beta_kto=10.0, kto_lambda_d=2.0, kto_lambda_u=1.0)
    assert out.metrics["rewards/kto_reference_point"].item() == 0.0
    assert out.logits.tolist() == pytest.approx([-0.5, 1.5])
    assert out.loss.tolist() == pytest.approx([1.244918662, 0.182425524], abs=1e-9)


def test_kto_reference_point_is_detached():
    """z carries no gradient: d loss_i / d err_j = 0 for i != j; d loss_w / d err_w = lambda_D beta sigma'(0.5)
    = 10 * 0.235003712 (z = 0.1 from r = [0.15, 0.05])."""
    err = t(0.1, 0.2).requires_grad_()
    out = kto_loss(err, t(0.25, 0.25), torch.tensor([True, False]), beta_kto=10.0, kto_lambda_d=1.0,
                   kto_lambda_u=1.0)
    out.loss[0].backward()
    assert err.grad.tolist() == pytest.approx([10 * 0.235003712, 0.0], abs=1e-8)


def test_objective_table():
    """Ten objectives: five losses, each in the latent and the perceptual space."""
    assert set(OBJECTIVES) == {p + n for p in ("", "ncp-") for n in ("sft", "dpo", "cpo", "mapo", "kto")}
    for name, obj in OBJECTIVES.items():
        base = name.removeprefix("ncp-")
        assert obj.space == ("perceptual" if name.startswith("ncp-") else "latent")
        assert obj.needs_reference == (base in ("dpo", "kto"))
        assert obj.needs_losers == (base != "sft")
        assert obj.per_image == (base == "kto")


def test_config_reads_the_table():
    """The config's objective names are the table's; each loss's hyperparameters are ObjectiveConfig fields,
    and each objective gets only its own."""
    import typing

    assert OBJECTIVE_NAMES == tuple(OBJECTIVES)
    assert typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"]) == tuple(OBJECTIVES)
    cfg = ObjectiveConfig()
    for name, obj in OBJECTIVES.items():
        assert set(obj.hyperparameters) <= set(typing.get_type_hints(ObjectiveConfig)), name
    assert OBJECTIVES["dpo"].loss_kwargs(cfg) == {"beta": cfg.beta}
    assert OBJECTIVES["ncp-cpo"].loss_kwargs(cfg) == {"beta_cpo": cfg.beta_cpo, "cpo_lambda": cfg.cpo_lambda}
    assert OBJECTIVES["mapo"].loss_kwargs(cfg) == {"beta_mapo": 0.1, "mapo_snr": 0.5, "mapo_lambda": 1.0}
    assert OBJECTIVES["kto"].loss_kwargs(cfg) == {"beta_kto": 1000.0, "kto_lambda_d": 1.0, "kto_lambda_u": 1.0}
    assert OBJECTIVES["sft"].loss_kwargs(cfg) == {}
    assert OBJECTIVES["mapo"].keyword_arguments[-1] == "num_timesteps"  # supplied by the step


def test_losses_refuse_other_objectives_hyperparameters():
    with pytest.raises(TypeError):
        dpo_loss(t(0.2), t(0.3), t(0.25), t(0.25), beta=10.0, beta_cpo=10.0)
