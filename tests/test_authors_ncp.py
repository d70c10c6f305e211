"""NCP as its authors ran it (issue 26): their SD1.5 feature set, error_scale=coef, CPO without its likelihood term."""
import math

import pytest
import torch

from ncp import ops
from ncp.config import ConfigError, load_config
from ncp.criterion import Criterion
from ncp.models import ConcatenatedTaps, concatenation_weights, encoder_features, resolve_taps
from ncp.objectives import cpo_loss
from ncp.schedule import NoiseSchedule
from ncp.step import branch_errors, preference_step, sample_noise, scale_errors
from ncp.config import DEFAULT_CONFIG


def authors_concat_intermediate_steps(intermediate_steps, normalize=False):
    """Verbatim from sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception,
    src/train/model_utils.py (the oracle: ncp's weights must give exactly this error)."""
    concat_steps = None
    batch_size, final_state_channels_num, min_resolution, min_resolution = intermediate_steps[-1].shape
    for hidden_state in intermediate_steps:
        reshaped_hidden_state = hidden_state.view(batch_size, -1, min_resolution, min_resolution)
        if normalize:
            norm_coeff = final_state_channels_num / reshaped_hidden_state.shape[1]
            reshaped_hidden_state = norm_coeff * reshaped_hidden_state
        if concat_steps is None:
            concat_steps = reshaped_hidden_state
        else:
            concat_steps = torch.cat((concat_steps, reshaped_hidden_state), dim=1)
    return concat_steps


# The bundled U-Net's taps at an 8x8 latent: conv_in 32x8x8, down blocks 32x4x4, 64x2x2, 64x2x2, mid 64x2x2.
BUNDLE_SHAPES = [(32, 8, 8), (32, 4, 4), (64, 2, 2), (64, 2, 2), (64, 2, 2)]


def test_concatenation_weights_hand_computed():
    """Element counts 2048, 512, 256, 256, 256 (3328 in all): unnormalized, each scale weighs N_s / 3328.
    Normalized: viewed at 2x2 the maps have 512, 128, 64, 64, 64 channels, k_s = 64 / those =
    1/8, 1/2, 1, 1, 1, and each squared error is multiplied by k_s^2: w_s = N_s k_s^2 / 3328 = 32, 128, 256,
    256, 256 over 3328."""
    assert concatenation_weights(BUNDLE_SHAPES, normalize=False) == pytest.approx(
        [2048 / 3328, 512 / 3328, 256 / 3328, 256 / 3328, 256 / 3328], rel=1e-12)
    assert concatenation_weights(BUNDLE_SHAPES, normalize=True) == pytest.approx(
        [32 / 3328, 128 / 3328, 256 / 3328, 256 / 3328, 256 / 3328], rel=1e-12)


def test_sd15_weights_hand_computed():
    """SD1.5 at a 64x64 latent: conv_in 320x64x64, down 320x32x32, 640x16x16, 1280x8x8, 1280x8x8, mid 1280x8x8;
    N_s / 64^2 = 320, 80, 40, 20, 20, 20 (500 in all); k_s = 1/16, 1/4, 1/2, 1, 1, 1; normalized w_s =
    1.25, 5, 10, 20, 20, 20 over 500."""
    shapes = [(320, 64, 64), (320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8), (1280, 8, 8)]
    assert concatenation_weights(shapes, False) == pytest.approx([x / 500 for x in (320, 80, 40, 20, 20, 20)])
    assert concatenation_weights(shapes, True) == pytest.approx([x / 500 for x in (1.25, 5, 10, 20, 20, 20)])


@pytest.mark.parametrize("normalize", [False, True])
def test_authors_error_is_one_mse_over_their_concatenation(normalize):
    """multiscale_error with the authors' weights equals their code's MSE over the concatenated views, for the
    policy and the reference, on random maps of the bundled U-Net's shapes."""
    gen = torch.Generator().manual_seed(0)
    n = 3
    maps = {k: [torch.randn((n, *s), generator=gen, dtype=torch.float64) for s in BUNDLE_SHAPES]
            for k in ("policy", "reference", "target")}
    weights = ConcatenatedTaps(normalize)(maps["policy"])
    err, err_ref = ops.reference.multiscale_error(maps["policy"], maps["reference"], maps["target"], weights)
    target = authors_concat_intermediate_steps(maps["target"], normalize)
    for mine, theirs in ((err, maps["policy"]), (err_ref, maps["reference"])):
        expected = (authors_concat_intermediate_steps(theirs, normalize) - target).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=0)


def test_views_that_do_not_fit_are_named():
    with pytest.raises(ValueError, match="cannot be viewed"):
        concatenation_weights([(3, 5, 5), (4, 2, 2)], False)


def test_resolve_taps_authors_and_conv_in():
    assert resolve_taps(["authors"], "sd15", 4) == ["conv_in", 0, 1, 2, 3, "mid"]
    assert resolve_taps(["authors"], "sdxl", 3) == [2]  # their SDXL script: the last down block
    assert resolve_taps(["mid", "conv_in", "1"], "sd15", 3) == ["conv_in", 1, "mid"]
    with pytest.raises(ValueError, match="conv_in"):
        resolve_taps(["conv_out"], "sd15", 3)


def test_conv_in_tap_is_conv_in_and_authors_taps_have_the_shapes(tiny_sd15):
    from fixtures import step_inputs_with_lora

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    unet = models.unet
    taps = resolve_taps(["authors"], "sd15", len(unet.down_blocks))
    t = torch.full((x0.shape[0],), 10)
    with torch.no_grad():
        feats = encoder_features(unet, x0, t, cond.repeat(2), taps)
        (conv_in,) = encoder_features(unet, x0, t, cond.repeat(2), ["conv_in"])
        torch.testing.assert_close(conv_in, unet.conv_in(x0))
    torch.testing.assert_close(feats[0], conv_in)
    assert len(feats) == len(unet.down_blocks) + 2
    assert feats[-1].shape[-2:] == feats[-2].shape[-2:]  # mid at the last down block's size


def test_noise_coefficient_table_hand_computed():
    """betas 0.1, 0.2, 0.3: abar 0.9, 0.72, 0.504; 1 / c_e^2 = (1 - abar_t) alpha_t / beta_t^2 =
    0.1 * 0.9 / 0.01 = 9, 0.28 * 0.8 / 0.04 = 5.6, 0.496 * 0.7 / 0.09 = 3.857777..."""
    betas = torch.tensor([0.1, 0.2, 0.3])
    sched = NoiseSchedule(betas, torch.cumprod(1 - betas, 0), "epsilon")
    torch.testing.assert_close(sched.noise_coefficient_table(), torch.tensor([9.0, 5.6, 0.496 * 0.7 / 0.09]))
    # the same c_e as the reverse step's
    c_e = sched.reverse_coefficients(torch.tensor([1, 2]))[:, 1]
    torch.testing.assert_close(sched.noise_coefficient_table()[1:], c_e.pow(-2))


def test_coef_scale_multiplies_and_needs_its_table():
    err = torch.tensor([2e-7, 4e-7], dtype=torch.float64)
    torch.testing.assert_close(scale_errors(err, "coef", torch.tensor([1e4, 5e3])),
                               torch.tensor([2e-3, 2e-3], dtype=torch.float64))
    with pytest.raises(ValueError, match="coef needs"):
        scale_errors(err, "coef")


def test_step_with_coef_is_dpo_on_errors_over_c_e_squared(tiny_sd15):
    """preference_step(error_scale=coef): the logit is -beta/2 of the policy-minus-reference difference of
    PL / c_e(t)^2, each pair at its own t; the metrics keep the raw errors."""
    from fixtures import step_inputs_with_lora

    models, schedule, x0, cond = step_inputs_with_lora(tiny_sd15)
    table = schedule.noise_coefficient_table()
    beta = 300.0
    noise = lambda: sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(3), torch.device("cpu"))  # noqa: E731
    criterion = Criterion.make("ncp-dpo", schedule, num_down_blocks=len(models.unet.down_blocks), beta=beta,
                               taps=["authors"], error_scale="coef")
    assert torch.equal(criterion.timestep_table, table) and criterion.tap_weights == ConcatenatedTaps(True)
    with torch.no_grad():
        out = preference_step(criterion, models.unet, models.unet, x0, cond, noise())
        n = noise()
        err, ref = branch_errors(criterion, models.unet, models.unet, x0, cond, n)  # raw errors
    w = table[n.t].double()
    d = (err[:2].double() - ref[:2].double()) * w - (err[2:].double() - ref[2:].double()) * w
    logits = -0.5 * beta * d
    assert out.metrics["rewards/margin"].item() == pytest.approx(logits.mean().item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(torch.nn.functional.softplus(-logits).mean().item(), rel=1e-4)
    assert out.metrics["err/policy_winner"].item() == pytest.approx(err[:2].mean().item(), rel=1e-5)


def test_cpo_without_likelihood_is_the_authors_loss():
    """cpo_lambda=0: the authors' --loss_type=cpo, -logsigmoid(-beta_dpo * model_diff) with their beta_dpo =
    ncp's beta_cpo / 2. err_w=0.1, err_l=0.3, beta_cpo=10: logit 1, loss log(1 + e^-1) = 0.313261687."""
    out = cpo_loss(torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
                   beta_cpo=10.0, cpo_lambda=0.0)
    assert out.logits.item() == pytest.approx(1.0, abs=1e-12)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["objective.name=dpo", "objective.error_scale=coef"], "use ncp-dpo"),
    (["objective.name=ncp-dpo", "objective.tap_normalize=false"], "taps=\\[authors\\] only"),
    (["objective.name=ncp-dpo", "objective.taps=[authors]", "objective.tap_weights=[1.0]"], "element count"),
])
def test_config_refuses_options_that_do_not_apply(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DEFAULT_CONFIG, overrides)


def test_authors_taps_train_from_the_cli(tmp_path, tiny_sd15, tiny_parquet):
    """The real CLI with the authors' taps, their normalization off, and coef: finite losses, a LoRA written."""
    import json

    from fixtures import cli_args
    from ncp.train import main

    out = tmp_path / "run"
    main(cli_args(tiny_sd15, tiny_parquet, out, "objective.taps=[authors]", "objective.tap_normalize=false",
                  "objective.error_scale=coef", "objective.beta=1000", "train.max_steps=2"))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(math.isfinite(r["loss"]) for r in recs)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
