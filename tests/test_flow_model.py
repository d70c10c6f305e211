"""The tiny random-weight SD3 pipeline folder (ncp.world.flow_model): loads offline, samples, is seeded,
and its in-process T5 tokenizer covers the world's captions."""
from __future__ import annotations

import random
import socket

import pytest
import torch

from ncp.scoring.scenes import sample_prompt, world_vocabulary
from ncp.world.flow_model import TINY_FLOW_SPEC, build_tiny_sd3


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture
def offline(monkeypatch):
    """HF offline mode, and any attempt to open a connection fails the test."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_folder_loads_offline_and_samples_a_64px_image(tiny_sd3_folder, offline):
    from diffusers import StableDiffusion3Pipeline

    size = sum(f.stat().st_size for f in tiny_sd3_folder.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_folder)
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * pipe.vae_scale_factor == 64
    caption = "a big red circle left of a blue square"
    pe, npe, pooled, npooled = pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=True,
                                                  max_sequence_length=12)
    clip_tokens = pipe.tokenizer.model_max_length
    assert pe.shape == npe.shape == (1, clip_tokens + 12, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == npooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    out = pipe(caption, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    (image,) = out.images
    assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_same_weights(tmp_path, tiny_sd3_folder):
    from diffusers import SD3Transformer2DModel

    load = lambda folder: SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()  # noqa: E731
    ref, again, other = load(tiny_sd3_folder), load(build_tiny_sd3(tmp_path / "a", seed=0)), \
        load(build_tiny_sd3(tmp_path / "b", seed=1))
    assert ref.keys() == again.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_t5_tokenizer_covers_the_world_and_pads(tiny_sd3_folder, offline):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny_sd3_folder / "tokenizer_3")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    rng = random.Random(0)
    captions = [sample_prompt(rng).caption() for _ in range(20)] + [" ".join(world_vocabulary())]
    for caption in captions:
        ids = tok(caption).input_ids
        assert tok.unk_token_id not in ids
        assert len(ids) == len(caption.split()) + 1 and ids[-1] == tok.eos_token_id  # one piece a word, then </s>
        assert tok.decode(ids, skip_special_tokens=True) == caption
    n = 16
    caption = captions[0]
    batch = tok([caption, "a red circle"], padding="max_length", max_length=n, truncation=True,
                add_special_tokens=True, return_tensors="pt")  # as StableDiffusion3Pipeline calls it
    assert batch.input_ids.shape == (2, n)
    k = len(caption.split()) + 1
    assert batch.input_ids[0, k:].eq(tok.pad_token_id).all() and batch.attention_mask[0].sum() == k
    assert batch.input_ids[1, :4].tolist() == tok("a red circle").input_ids
    assert tok(" ".join(["red"] * 40), max_length=n, truncation=True).input_ids[-1] == tok.eos_token_id
    assert tok.model_max_length == TINY_FLOW_SPEC.t5_max_length
