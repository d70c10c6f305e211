"""The six objectives against values worked out by hand."""
import math

import pytest
import torch

from ncp.objectives import OBJECTIVES, cpo_loss, dpo_loss, sft_loss


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


def test_objective_table():
    assert set(OBJECTIVES) == {"sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo"}
    for name, obj in OBJECTIVES.items():
        assert obj.space == ("perceptual" if name.startswith("ncp-") else "latent")
        assert obj.needs_reference == name.endswith("dpo")
        assert obj.needs_losers == (not name.endswith("sft"))
