"""CPU integration: MaPO and KTO (both spaces) through the real CLI on tiny models, and KTO's pair split."""
import json
import subprocess
import sys

import pytest
import torch

from fixtures import cli_args, lora_moves_unet

NEW_OBJECTIVES = ["mapo", "ncp-mapo", "kto", "ncp-kto"]


def _args(model, parquet, out, *extra):
    return cli_args(model, parquet, out, "train.max_steps=2", "optim.lr=1e-3", "train.cpu_threads=1", *extra)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", NEW_OBJECTIVES)
def test_cli_trains_new_objective(objective, tiny_sd15, tiny_parquet, tmp_path):
    """``python -m ncp.train objective.name=...``: finite losses, the objective's own metrics, a LoRA that
    changes the U-Net. MaPO runs no reference pass (no reference errors); KTO does."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ncp.train", *_args(tiny_sd15, tiny_parquet, out,
                                                                  f"objective.name={objective}")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = _metrics(out)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    is_kto = objective.endswith("kto")
    assert ("err/reference_winner" in lines[0]) == is_kto
    assert "rewards/accuracy" in lines[0] and "err/policy_loser" in lines[0]
    assert ("rewards/kto_reference_point" in lines[0]) == is_kto
    assert ("loss/mapo_ratio" in lines[0]) == (not is_kto)

    assert lora_moves_unet(tiny_sd15, out / "lora") > 1e-7


@pytest.mark.parametrize("objective", ["ncp-mapo", "ncp-kto"])
def test_new_objectives_train_sdxl(objective, tiny_sdxl, tiny_parquet, tmp_path):
    from ncp.train import main

    out = tmp_path / "xl"
    assert main(_args(tiny_sdxl, tiny_parquet, out, f"objective.name={objective}")) == 0
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in _metrics(out))


@pytest.mark.parametrize("objective", ["kto", "ncp-kto"])
def test_kto_on_pairs_is_kto_on_labelled_images(objective, tiny_sd15):
    """Pairs feed KTO as 2B labelled images (winners desirable, losers undesirable): the step's loss is
    kto_loss of the branch errors with those labels, and the unpaired form with the same images, noise and
    labels gives the same loss."""
    from fixtures import criterion_of
    from ncp.models import add_lora, encode_prompts, load_models
    from ncp.objectives import kto_loss
    from ncp.schedule import NoiseSchedule
    from ncp.step import StepNoise, branch_errors, preference_step, sample_noise

    torch.manual_seed(0)
    models = load_models(str(tiny_sd15), "auto", torch.device("cpu"), torch.float32)
    add_lora(models.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)
    for name, p in models.unet.named_parameters():
        if "lora_B" in name:  # a policy that differs from the reference
            p.data.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    schedule = NoiseSchedule.from_scheduler(models.scheduler, torch.device("cpu"))
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # 2 winners, then 2 losers
    cond = encode_prompts(models, ["a red cube", "two blue balls"])
    noise = sample_noise(2, (4, 16, 16), 1000, torch.Generator().manual_seed(1), torch.device("cpu"))
    kwargs = dict(beta_kto=1e4, kto_lambda_d=1.0, kto_lambda_u=0.5)
    criterion = criterion_of(objective, schedule, [0, "mid"], [0.5, 0.5], **kwargs)
    with torch.no_grad():
        out = preference_step(criterion, models.unet, models.unet, x0, cond, noise)
        err, ref = branch_errors(criterion, models.unet, models.unet, x0, cond, noise)
        labels = torch.tensor([True, True, False, False])
        expect = kto_loss(err, ref, labels, **kwargs)
        assert (expect.logits != 0).all()  # the policy differs from the reference: a non-trivial check
        assert out.loss.item() == pytest.approx(expect.loss.mean().item(), rel=1e-5)
        # the unpaired form: 4 images, each with its own copy of its pair's noise and prompt
        per_image = StepNoise(noise.t.repeat(2), noise.eps.repeat(2, 1, 1, 1), noise.z.repeat(2, 1, 1, 1))
        unpaired = preference_step(criterion, models.unet, models.unet, x0, cond.repeat(2), per_image, labels)
    assert unpaired.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert unpaired.metrics.keys() == out.metrics.keys()


def test_unpaired_images_need_a_per_image_objective(tiny_sd15):
    from ncp.criterion import Criterion
    from ncp.schedule import NoiseSchedule
    from ncp.step import preference_step

    schedule = NoiseSchedule(torch.full((10,), 0.01), torch.cumprod(torch.full((10,), 0.99), 0), "epsilon")
    with pytest.raises(ValueError, match="per-image objective"):
        preference_step(Criterion.make("dpo", schedule, beta=1.0), None, None, torch.zeros(1), None,
                        type("N", (), {"t": torch.zeros(2)})(), torch.tensor([True, False]))
