"""The Flux.1 family (ncp.families.flux) on a tiny random-weight FluxPipeline (ncp.world.flow_model): detection
and prompt encoding against the pipeline's own, latent packing against diffusers', the flow step through the
packed transformer call against hand-written formulas and the tested DiT-NCP definition (ncp.families.dit),
and every objective through the real CLI, resume and the LoRA in the pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from flow_checks import (CAPTIONS, FLOW_TARGETS, check_cache_gives_pixel_losses, check_gpu_step, check_lora_in_pipeline,
                         check_objective_trains, check_resume_is_bit_identical, flow_args)

from ncp.objectives import OBJECTIVES

CAPTIONS = ["a red cube on a blue floor", "two green balls"]
TARGETS = FLOW_TARGETS


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from ncp.world.flow_model import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def models(tiny_flux):
    from ncp.models import add_lora, load_models

    m = load_models(str(tiny_flux), "auto", torch.device("cpu"), torch.float32)
    add_lora(m.unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"], 0.0)  # B = 0: the policy is still the base
    return m


def _packed_call(transformer, x, sigma, cond, guidance: float | None = 3.5):
    """The transformer call of FluxPipeline and diffusers' Flux LoRA training script, by hand."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=sigma,
        guidance=None if guidance is None else torch.full((b,), guidance), pooled_projections=cond.pooled,
        encoder_hidden_states=cond.hidden_states, txt_ids=torch.zeros(cond.hidden_states.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_detected_and_loaded_as_flux(tiny_flux, models):
    from ncp.families import detect_kind, family

    assert detect_kind(str(tiny_flux)) == "flux"  # not SDXL, though it has a text_encoder_2
    assert models.kind == "flux"
    assert type(models.unet).__name__ == "FluxTransformer2DModel"
    assert type(models.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert [type(e).__name__ for e in models.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]
    assert models.unet.config.guidance_embeds
    assert family("flux").tap_units(models.unet) == 4  # 2 double-stream + 2 single-stream blocks


def test_prompts_encode_as_the_pipeline_encodes_them(tiny_flux, models):
    from diffusers import FluxPipeline

    from ncp.models import encode_prompts

    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, CAPTIONS)
    cond = encode_prompts(models, CAPTIONS)
    assert cond.hidden_states.shape == (2, 512, 32) and cond.pooled.shape == (2, 16)
    torch.testing.assert_close(cond.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.time_ids is None
    assert torch.equal(text_ids, torch.zeros(512, 3))


def test_packing_is_diffusers_packing():
    from diffusers import FluxPipeline

    from ncp.families.flux import latent_image_ids, pack_latents, unpack_latents

    x = torch.randn(3, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (3, 12, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 8, 6))
    assert torch.equal(packed[0, 0], x[0, :, :2, :2].flatten())  # a token: the 2x2 patch, channel by channel
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    assert torch.equal(unpack_latents(packed, 8, 6), FluxPipeline._unpack_latents(packed, 64, 48, 8))
    assert torch.equal(latent_image_ids(8, 6, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(3, 4, 3, torch.device("cpu"), torch.float32))


def _step_inputs(models):
    from ncp.models import encode_prompts
    from ncp.step import StepNoise

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 16, 8, 8, generator=g)  # winners then losers of 2 pairs
    noise = StepNoise(torch.tensor([120, 700]), torch.randn(2, 16, 8, 8, generator=g),
                      torch.randn(2, 16, 8, 8, generator=g))
    return x0, encode_prompts(models, CAPTIONS), noise


def test_the_training_sigmas_are_unshifted(models):
    """Flux's scheduler shifts at sampling (by resolution); its training sigmas, which diffusers' Flux script
    draws from, are the linear ones."""
    from ncp.families import family

    schedule = family("flux").training_schedule(models.scheduler, torch.device("cpu"))
    torch.testing.assert_close(schedule.sigmas, torch.linspace(1, 1 / 1000, 1000))
    assert schedule.model_timestep(torch.tensor([0, 999])).tolist() == pytest.approx([1000.0, 1.0])


def test_latent_errors_are_the_velocity_error(models):
    """Flow-DPO's errors: ||v_theta(x_sigma, sigma) - (eps - x0)||^2 per image through the packed call with
    guidance 3.5, x_sigma = (1 - s) x0 + s eps."""
    from ncp.criterion import Criterion
    from ncp.families import family
    from ncp.step import branch_errors

    fam = family("flux")
    schedule = fam.training_schedule(models.scheduler, torch.device("cpu"))
    crit = Criterion.make("dpo", schedule, kind="flux", num_down_blocks=fam.tap_units(models.unet))
    x0, cond, noise = _step_inputs(models)
    with torch.no_grad():
        err, ref = branch_errors(crit, models.unet, models.unet, x0, cond, noise)
    s = schedule.sigmas[noise.t].repeat(2).view(-1, 1, 1, 1)
    eps = noise.eps.repeat(2, 1, 1, 1)
    with torch.no_grad():
        pred = _packed_call(models.unet, (1 - s) * x0 + s * eps, s.flatten(), cond.repeat(2))
    want = (pred - (eps - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(err, want)
    torch.testing.assert_close(ref, want)  # no adapter: the reference is the policy


def test_schnell_gets_no_guidance(tmp_path):
    """A transformer without the guidance embedding (FLUX.1 [schnell]) is called without guidance."""
    from diffusers import FluxTransformer2DModel

    from ncp.families import family
    from ncp.families.base import Conditioning
    from ncp.world.flow_model import FluxSpec, build_tiny_flux

    folder = build_tiny_flux(tmp_path / "schnell", spec=FluxSpec(guidance_embeds=False))
    transformer = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    cond = Conditioning(torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g))
    fam = family("flux")
    assert fam.guidance(transformer, 2, x.device) is None
    with torch.no_grad():
        got = fam.denoise(transformer, x, torch.tensor([300.0, 800.0]), cond)
        want = _packed_call(transformer, x, torch.tensor([0.3, 0.8]), cond, guidance=None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("error_scale,taps,want_taps", [("paper", "auto", [0, 1]), ("coef", "auto", [0, 1]),
                                                        ("paper", "3,1", [1, 3])])
def test_perceptual_errors_are_the_dit_definition(models, error_scale, taps, want_taps):
    """NCP-DPO's step on Flux gives ncp.families.dit.perceptual_errors with flux_block_features on the packed
    latents (taps: ``auto``, a quarter and half the depth, or a double- and a single-stream block), and
    ``coef`` weighs each image by the Euler step's coefficient."""
    from ncp.criterion import Criterion
    from ncp.families import family
    from ncp.families.dit import flux_block_features, perceptual_errors
    from ncp.families.flux import latent_image_ids, pack_latents
    from ncp.step import branch_errors

    fam = family("flux")
    schedule = fam.training_schedule(models.scheduler, torch.device("cpu"))
    crit = Criterion.make("ncp-dpo", schedule, kind="flux", num_down_blocks=fam.tap_units(models.unet),
                          taps=taps.split(","), error_scale=error_scale)
    assert list(crit.taps) == want_taps
    x0, cond, noise = _step_inputs(models)
    with torch.no_grad():
        err, _ = branch_errors(crit, models.unet, models.unet, x0, cond, noise)
    c2 = cond.repeat(2)
    t = noise.t.repeat(2)
    s, s_next = schedule.sigmas[t], schedule.next_sigma(t)
    eps = noise.eps.repeat(2, 1, 1, 1)
    x = schedule.add_noise(x0, eps, t)
    txt_ids, img_ids = torch.zeros(512, 3), latent_image_ids(8, 8, x.device, x.dtype)
    guidance = torch.full((4,), 3.5)
    feats = lambda z, sig: flux_block_features(models.unet, pack_latents(z), sig, c2.hidden_states, c2.pooled,  # noqa: E731
                                               txt_ids, img_ids, guidance, want_taps)
    with torch.no_grad():
        v = _packed_call(models.unet, x, s, c2)
        (want,) = perceptual_errors(feats, s, s_next, x, [v], eps - x0, [0.5, 0.5])
    torch.testing.assert_close(err, want, rtol=1e-4, atol=1e-9)  # the raw errors; the loss sees them scaled
    weights = crit.image_weights(noise.t, 4)
    if error_scale == "coef":  # 1 / (sigma_i - sigma_{i+1})^2, the Euler step's coefficient squared
        torch.testing.assert_close(weights, (s - s_next).double().pow(-2).float())
    else:
        assert weights is None


def test_transformer_taps_are_block_indices(models):
    from ncp.models import resolve_taps

    assert resolve_taps(["3", "0"], "flux", 4) == [0, 3]
    with pytest.raises(ValueError, match=r"block index in 0..3"):
        resolve_taps(["mid"], "flux", 4)




@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_flux(objective, tiny_flux, tiny_parquet, tmp_path):
    """``python -m ncp.train`` on the Flux folder: finite losses, perf/tflops of 512 T5 tokens, a LoRA on the
    attention projections of both streams (the single-stream blocks' to_q/k/v too)."""
    keys = check_objective_trains(objective, tiny_flux, tiny_parquet, tmp_path, text_len=512)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in keys)


def test_flux_resume_is_bit_identical(tiny_flux, tiny_parquet, tmp_path):
    check_resume_is_bit_identical(tiny_flux, tiny_parquet, tmp_path)


def test_the_lora_loads_in_the_pipeline_as_it_trained(tiny_flux, tiny_parquet, tmp_path):
    """``FluxPipeline.load_lora_weights`` of the exported LoRA gives the transformer the trained module's
    outputs, and so the same images."""
    from diffusers import FluxPipeline

    from ncp.models import add_lora, load_lora_into, load_models
    from ncp.train import main

    out = tmp_path / "run"
    assert main(flow_args(tiny_flux, tiny_parquet, out, "objective.name=dpo", "optim.lr=3e-2", TARGETS)) == 0
    lora = json.loads((out / "step-000002" / "config.json").read_text())["lora"]
    mine = load_models(str(tiny_flux), "auto", torch.device("cpu"), torch.float32)
    add_lora(mine.unet, lora["rank"], lora["alpha"], lora["target_modules"], 0.0)
    load_lora_into(mine.unet, out / "lora")
    pipe = FluxPipeline.from_pretrained(str(tiny_flux))
    g = torch.Generator().manual_seed(0)
    x, text, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 32, generator=g), torch.randn(1, 16, generator=g)
    call = dict(hidden_states=x, timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]), encoder_hidden_states=text,
                pooled_projections=pooled, txt_ids=torch.zeros(7, 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, x.device, x.dtype))
    check_lora_in_pipeline(pipe, mine, "flux", out / "lora", call)


def test_training_from_the_cache_gives_the_pixel_losses(tiny_flux, tiny_parquet, tmp_path):
    """The latent and text cache holds Flux's 16-channel latents, its T5 embeddings and CLIP pooled
    embeddings: ``ncp.train`` on the cache gives the losses of training on the pixels (Rust loader)."""
    check_cache_gives_pixel_losses(tiny_flux, tiny_parquet, tmp_path, "flux")


@pytest.mark.cuda
@pytest.mark.parametrize("objective", ["dpo", "ncp-dpo"])
def test_a_gpu_step_measures_the_errors_the_cpu_does(objective, tiny_flux, tiny_parquet, tmp_path):
    """One step on the GPU under bf16 autocast (the perceptual path in fp32: model.perceptual_precision=auto)
    measures the first step's errors as the CPU's fp32 run does, within bf16's rounding; the LoRA is finite."""
    check_gpu_step(objective, tiny_flux, tiny_parquet, tmp_path)
