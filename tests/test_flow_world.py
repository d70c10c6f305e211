"""The flow world (``python -m ncp.world build --family sd3``): a tiny build through the real CLI, its VAE's
measured shift and scale, the frozen text encoders of the flawed phases, and the T5 length rule it relies on."""
from __future__ import annotations

import json
import random

import pytest
import torch

from ncp.families import family, pipeline_family
from ncp.families.base import t5_length
from ncp.world.flow_model import TINY_FLOW_SPEC, build_t5_tokenizer, sd3_pipeline
from ncp.world.pretrain import PretrainConfig, SceneStream, to_unit, train_vae


@pytest.fixture(scope="module")
def tiny_flow_world(tmp_path_factory):
    from ncp.world.__main__ import main

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("flow-world")
    main(["build", "--family", "sd3", "--tiny", "--out", str(out), "--keep-stages"])
    return out


def test_tiny_flow_world_is_an_sd3_pipeline_with_pick_a_pic_data(tiny_flow_world):
    import pyarrow.parquet as pq

    from ncp.families import detect_kind
    from ncp.sampling import generate, load_pipeline

    world = json.loads((tiny_flow_world / "world.json").read_text())
    assert world["family"] == "sd3"
    assert set(world["params"]) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert world["stats"]["pairs"]["rows"] > 0
    rows = pq.read_table(tiny_flow_world / "data" / "train-00000.parquet")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(rows.column_names)
    heldout = (tiny_flow_world / "data" / "heldout_prompts.txt").read_text().split("\n")[:-1]
    assert len(heldout) == 4 and not set(heldout) & set(rows.column("caption").to_pylist())
    model = tiny_flow_world / "model"
    assert detect_kind(str(model)) == "sd3"
    pipe = load_pipeline(model)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.scheduler.config.shift == 1.0
    (img,) = generate(pipe, [heldout[0]], [0], steps=2)
    assert img.shape == (32, 32, 3) and img.dtype.name == "uint8"


def test_flow_world_vae_shift_and_scale_are_the_latents_mean_and_inverse_std(tiny_flow_world):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_flow_world / "model", subfolder="vae")
    assert vae.config.shift_factor is not None and vae.config.scaling_factor != 1.0
    # the SD1.5 world's path is unchanged: no shift
    cfg = PretrainConfig(vae_steps=2, vae_batch=4, warmup=1)
    plain = sd3_pipeline(TINY_FLOW_SPEC, seed=0).vae
    plain.register_to_config(shift_factor=None)
    train_vae(plain, SceneStream(5, 64, set()), cfg, log=lambda s: None)
    assert plain.config.shift_factor is None
    # shift=True: exactly the mean of the 256 scenes it draws after training
    shifted = sd3_pipeline(TINY_FLOW_SPEC, seed=0).vae
    scale = train_vae(shifted, SceneStream(5, 64, set()), cfg, log=lambda s: None, shift=True)
    replay = SceneStream(5, 64, set())
    for _ in range(cfg.vae_steps):
        replay.batch(cfg.vae_batch)
    with torch.no_grad():
        z = shifted.encode(to_unit(replay.batch(256)[1])).latent_dist.mean
    assert shifted.config.shift_factor == pytest.approx(float(z.mean()), rel=1e-6)
    assert scale == shifted.config.scaling_factor == pytest.approx(float(1 / z.std()), rel=1e-6)


def test_flawed_flow_phase_trains_the_transformer_and_freezes_the_text_encoders(tiny_flow_world):
    from safetensors.torch import load_file

    phase1, final = tiny_flow_world / ".stages" / "phase1", tiny_flow_world / "model"
    for enc in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = load_file(phase1 / enc / "model.safetensors"), load_file(final / enc / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), enc
    vae0 = load_file(tiny_flow_world / ".stages" / "vae" / "diffusion_pytorch_model.safetensors")
    vae1 = load_file(final / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae0[k], vae1[k]) for k in vae0)
    t1 = load_file(phase1 / "transformer" / "diffusion_pytorch_model.safetensors")
    t2 = load_file(final / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(t1[k], t2[k]) for k in t1)


def test_world_cli_rejects_unknown_families_and_the_bundle_folder_for_sd3(capsys):
    from ncp.world.__main__ import main
    from ncp.world.build import default_config, tiny_config

    with pytest.raises(SystemExit):
        main(["build", "--family", "sdxl", "--tiny"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--family", "sd3"])
    assert "needs --out" in capsys.readouterr().err
    for make in (default_config, tiny_config):
        with pytest.raises(ValueError, match="unknown world family 'flux'"):
            make(0, "flux")
    assert default_config(0, "sd3").family == "sd3" and default_config(0).family == "sd15"


def test_t5_length_is_the_pipeline_default_unless_the_tokenizer_is_shorter():
    assert t5_length(256, build_t5_tokenizer(max_length=24)) == 24
    assert t5_length(256, build_t5_tokenizer(max_length=512)) == 256
    assert t5_length(512, build_t5_tokenizer(max_length=512)) == 512


def test_sd3_samples_and_encodes_with_the_same_t5_length():
    pipe = sd3_pipeline(TINY_FLOW_SPEC, seed=0)
    fam = pipeline_family(pipe)
    assert fam is family("sd3")
    n = fam.sampling_kwargs(pipe)["max_sequence_length"]
    assert n == min(256, pipe.tokenizer_3.model_max_length)
    caption = " ".join(random.Random(0).choice(["red", "circle", "left", "of"]) for _ in range(40))
    cond = fam.encode([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                      [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], [caption],
                      torch.device("cpu"), torch.float32)
    embeds, _, _, _ = pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=False,
                                         max_sequence_length=n)
    assert cond.hidden_states.shape == embeds.shape
    torch.testing.assert_close(cond.hidden_states, embeds)
    with pytest.raises(ValueError, match="no model family samples with a object"):
        pipeline_family(object())
