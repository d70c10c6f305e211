"""The SD3 family (ncp.families.sd3) on a tiny random-weight StableDiffusion3Pipeline (ncp.world.flow_model):
detection and prompt encoding against the pipeline's own, the flow step against hand-written formulas and the
tested DiT-NCP definition (ncp.families.dit), and every objective through the real CLI, resume and the LoRA in
the pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from flow_checks import (CAPTIONS, check_cache_gives_pixel_losses, check_gpu_step, check_lora_in_pipeline,
                         check_objective_trains, check_resume_is_bit_identical, flow_args)

from ncp.objectives import OBJECTIVES


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from ncp.world.flow_model import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def models(tiny_sd3):
    from ncp.models import add_lora, load_models

    m = load_models(str(tiny_sd3), "auto", torch.device("cpu"), torch.float32)
    add_lora(m.unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)  # B = 0: the policy is still the base
    return m


def test_detected_and_loaded_as_sd3(tiny_sd3, models):
    from ncp.families import detect_kind

    assert detect_kind(str(tiny_sd3)) == "sd3"
    assert models.kind == "sd3"
    assert type(models.unet).__name__ == "SD3Transformer2DModel"
    assert type(models.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert [type(e).__name__ for e in models.text_encoders] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]


def test_prompts_encode_as_the_pipeline_encodes_them(tiny_sd3, models):
    from diffusers import StableDiffusion3Pipeline

    from ncp.models import encode_prompts

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, CAPTIONS, do_classifier_free_guidance=False)
    cond = encode_prompts(models, CAPTIONS)
    assert cond.hidden_states.shape == (2, 24 + 256, 32) and cond.pooled.shape == (2, 32)
    torch.testing.assert_close(cond.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.time_ids is None


def test_the_flow_reverse_step_is_the_euler_step(models):
    """The fused reverse-step op with the flow's coefficients [1, sigma_i - sigma_{i+1}, 0] is
    x + (sigma_{i+1} - sigma_i) v; coef's table is 1 / (sigma_i - sigma_{i+1})^2 (last: sigma_{i+1} = 0)."""
    from ncp import ops
    from ncp.families import family

    schedule = family("sd3").training_schedule(models.scheduler, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, v, other = (torch.randn(3, 16, 8, 8, generator=g) for _ in range(3))
    idx = torch.tensor([0, 500, 999])
    s, s_next = schedule.sigmas[idx], torch.cat([schedule.sigmas[1:], torch.zeros(1)])[idx]
    prev, prev_other = ops.reverse_step(x, v, other[None], torch.randn(3, 16, 8, 8, generator=g),
                                        schedule.reverse_coefficients(idx))
    by_hand = lambda u: x + (s_next - s).view(-1, 1, 1, 1) * u  # noqa: E731
    torch.testing.assert_close(prev, by_hand(v))
    torch.testing.assert_close(prev_other[0], by_hand(other))
    table = schedule.noise_coefficient_table()
    torch.testing.assert_close(table[idx], (s.double() - s_next.double()).pow(-2).float())
    assert schedule.model_timestep(idx).tolist() == pytest.approx((1000 * s).tolist())


def _step_inputs(models):
    from ncp.models import encode_prompts
    from ncp.step import StepNoise

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 16, 8, 8, generator=g)  # winners then losers of 2 pairs
    noise = StepNoise(torch.tensor([120, 700]), torch.randn(2, 16, 8, 8, generator=g),
                      torch.randn(2, 16, 8, 8, generator=g))
    return x0, encode_prompts(models, CAPTIONS), noise


def test_latent_errors_are_the_velocity_error(models):
    """Flow-DPO's errors: ||v_theta(x_sigma, 1000 sigma) - (eps - x0)||^2 per image, x_sigma = (1 - s) x0 + s eps."""
    from ncp.criterion import Criterion
    from ncp.families import family
    from ncp.step import branch_errors

    fam = family("sd3")
    schedule = fam.training_schedule(models.scheduler, torch.device("cpu"))
    crit = Criterion.make("dpo", schedule, kind="sd3", num_down_blocks=fam.tap_units(models.unet))
    x0, cond, noise = _step_inputs(models)
    with torch.no_grad():
        err, ref = branch_errors(crit, models.unet, models.unet, x0, cond, noise)
    s = schedule.sigmas[noise.t].repeat(2).view(-1, 1, 1, 1)
    eps = noise.eps.repeat(2, 1, 1, 1)
    c2 = cond.repeat(2)
    with torch.no_grad():
        pred = models.unet(hidden_states=(1 - s) * x0 + s * eps, timestep=(1000 * s).flatten(),
                           encoder_hidden_states=c2.hidden_states, pooled_projections=c2.pooled).sample
    want = (pred - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(err, want)
    torch.testing.assert_close(ref, want)  # no adapter: the reference is the policy


@pytest.mark.parametrize("error_scale", ["paper", "coef"])
def test_perceptual_errors_are_the_dit_definition(models, error_scale):
    """NCP-DPO's step on SD3 gives ncp.families.dit.perceptual_errors (tested against hooked float64
    features in test_dit_ncp.py) with the taps ``auto`` resolves to (a quarter and half the depth), and
    ``coef`` weighs each image by the Euler step's coefficient."""
    from ncp.criterion import Criterion
    from ncp.families import family
    from ncp.families.dit import perceptual_errors, sd3_block_features
    from ncp.step import branch_errors

    fam = family("sd3")
    schedule = fam.training_schedule(models.scheduler, torch.device("cpu"))
    crit = Criterion.make("ncp-dpo", schedule, kind="sd3", num_down_blocks=fam.tap_units(models.unet),
                          taps=["auto"], error_scale=error_scale)
    assert crit.taps == (0, 1)  # 4 blocks: 4 // 4 - 1, 4 // 2 - 1
    x0, cond, noise = _step_inputs(models)
    with torch.no_grad():
        err, _ = branch_errors(crit, models.unet, models.unet, x0, cond, noise)
    c2 = cond.repeat(2)
    t = noise.t.repeat(2)
    s, s_next = schedule.sigmas[t], schedule.next_sigma(t)
    eps = noise.eps.repeat(2, 1, 1, 1)
    x = schedule.add_noise(x0, eps, t)
    feats = lambda z, sig: sd3_block_features(models.unet, z, 1000 * sig, c2.hidden_states, c2.pooled, [0, 1])  # noqa: E731
    with torch.no_grad():
        v = models.unet(hidden_states=x, timestep=1000 * s, encoder_hidden_states=c2.hidden_states,
                        pooled_projections=c2.pooled).sample
        (want,) = perceptual_errors(feats, s, s_next, x, [v], eps - x0, [0.5, 0.5])
    torch.testing.assert_close(err, want, rtol=1e-4, atol=1e-9)  # the raw errors; the loss sees them scaled
    weights = crit.image_weights(noise.t, 4)
    if error_scale == "coef":  # 1 / (sigma_i - sigma_{i+1})^2, the Euler step's coefficient squared
        torch.testing.assert_close(weights, (s - s_next).double().pow(-2).float())
    else:
        assert weights is None


def test_transformer_taps_are_block_indices(models):
    from ncp.models import resolve_taps

    assert resolve_taps(["2", "0"], "sd3", 4) == [0, 2]
    with pytest.raises(ValueError, match=r"block index in 0..3"):
        resolve_taps(["mid"], "sd3", 4)
    with pytest.raises(ValueError, match="twice"):
        resolve_taps(["1", "1"], "sd3", 4)




@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_sd3(objective, tiny_sd3, tiny_parquet, tmp_path):
    """``python -m ncp.train`` on the SD3 folder: finite losses, perf/tflops of 24 CLIP + 256 T5 tokens, a LoRA
    on the joint-attention projections of both streams."""
    check_objective_trains(objective, tiny_sd3, tiny_parquet, tmp_path, text_len=24 + 256)


def test_sd3_resume_is_bit_identical(tiny_sd3, tiny_parquet, tmp_path):
    check_resume_is_bit_identical(tiny_sd3, tiny_parquet, tmp_path)


def test_the_lora_loads_in_the_pipeline_as_it_trained(tiny_sd3, tiny_parquet, tmp_path):
    """``StableDiffusion3Pipeline.load_lora_weights`` of the exported LoRA gives the transformer the trained
    module's outputs, and so the same images."""
    from diffusers import StableDiffusion3Pipeline

    from ncp.models import add_lora, load_lora_into, load_models
    from ncp.train import main

    out = tmp_path / "run"
    assert main(flow_args(tiny_sd3, tiny_parquet, out, "objective.name=dpo", "optim.lr=3e-2")) == 0
    lora = json.loads((out / "step-000002" / "config.json").read_text())["lora"]
    mine = load_models(str(tiny_sd3), "auto", torch.device("cpu"), torch.float32)
    add_lora(mine.unet, lora["rank"], lora["alpha"], lora["target_modules"], 0.0)
    load_lora_into(mine.unet, out / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    g = torch.Generator().manual_seed(0)
    x, text, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g)
    call = dict(hidden_states=x, timestep=torch.tensor([400.0]), encoder_hidden_states=text, pooled_projections=pooled)
    check_lora_in_pipeline(pipe, mine, "sd3", out / "lora", call)


def test_training_from_the_cache_gives_the_pixel_losses(tiny_sd3, tiny_parquet, tmp_path):
    """The latent and text cache holds SD3's 16-channel latents, its CLIP + T5 embeddings and pooled
    embeddings: ``ncp.train`` on the cache gives the losses of training on the pixels (Rust loader)."""
    check_cache_gives_pixel_losses(tiny_sd3, tiny_parquet, tmp_path, "sd3")


def test_the_unet_only_exports_refuse_a_flow_model_by_name(tiny_sd3, tmp_path):
    from ncp.export import ExportError, export_kohya, export_merged

    for export in (lambda: export_kohya(tmp_path / "lora", str(tiny_sd3), tmp_path / "k.safetensors"),
                   lambda: export_merged(tmp_path / "lora", str(tiny_sd3), tmp_path / "merged")):
        with pytest.raises(ExportError, match=r"is a sd3 model.*StableDiffusion3Pipeline.*load_lora_weights"):
            export()
    assert not (tmp_path / "merged").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["dpo", "ncp-dpo"])
def test_a_gpu_step_measures_the_errors_the_cpu_does(objective, tiny_sd3, tiny_parquet, tmp_path):
    """One step on the GPU under bf16 autocast (the perceptual path in fp32: model.perceptual_precision=auto)
    measures the first step's errors as the CPU's fp32 run does, within bf16's rounding; the LoRA is finite."""
    check_gpu_step(objective, tiny_sd3, tiny_parquet, tmp_path)
