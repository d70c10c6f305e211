"""The bundled world: grammar, tokenizer, judge, preference rows, deterministic builds, the shipped bundle."""
from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ncp.paths import bundle_path  # noqa: E402
from ncp.scoring.judge import judge  # noqa: E402
from ncp.scoring.scenes import Obj, Prompt, Scene, parse_caption, render, sample_prompt, scene_for, world_vocabulary  # noqa: E402
from ncp.world.prefdata import make_rows, pair_stats, AnnotatorConfig  # noqa: E402
from ncp.world.tokenizer import build_tokenizer  # noqa: E402


def test_captions_parse_back_to_their_prompt():
    rng = random.Random(0)
    for _ in range(500):
        p = sample_prompt(rng)
        assert parse_caption(p.caption()) == p
    assert parse_caption("a photo of an astronaut riding a horse") is None


def test_tokenizer_encodes_each_world_word_as_one_token():
    tok = build_tokenizer(24)
    for w in world_vocabulary():
        ids = tok(w, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == [w + "</w>"], w
    ids = tok("a red circle left of a blue square").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 10
    assert len(tok("zebra on mars, 1987").input_ids) > 2  # out-of-grammar text still encodes (bytes)


def test_renders_of_the_grammar_satisfy_the_judge():
    rng = random.Random(1)
    for _ in range(200):
        p = sample_prompt(rng)
        j = judge(render(scene_for(p, rng)), p.caption())
        assert j.correct, (p.caption(), j.checks)
        assert j.score > 0.95


def _img(bg: str, *objs: tuple[str, str, str, float, float]) -> np.ndarray:
    return render(Scene(bg, [Obj(s, c, z, x, y) for s, c, z, x, y in objs]))


# (prompt, correct image, wrong image): each wrong image breaks one thing the prompt asks
CASES = [
    ("a red circle left of a blue square",
     _img("black", ("circle", "red", "small", 8, 16), ("square", "blue", "small", 24, 16)),
     _img("black", ("circle", "red", "small", 24, 16), ("square", "blue", "small", 8, 16))),
    ("a green triangle above a yellow circle",
     _img("gray", ("triangle", "green", "big", 16, 9), ("circle", "yellow", "small", 16, 25)),
     _img("gray", ("triangle", "green", "big", 16, 22), ("circle", "yellow", "small", 16, 6))),
    ("three purple squares",
     _img("white", ("square", "purple", "small", 6, 6), ("square", "purple", "small", 20, 10), ("square", "purple", "small", 12, 24)),
     _img("white", ("square", "purple", "small", 6, 6), ("square", "purple", "small", 20, 10))),
    ("two blue circles",
     _img("black", ("circle", "blue", "small", 8, 8), ("circle", "blue", "small", 22, 22)),
     _img("black", ("triangle", "blue", "small", 8, 8), ("triangle", "blue", "small", 22, 22))),
    ("a big red square on the left",
     _img("black", ("square", "red", "big", 9, 16)),
     _img("black", ("square", "red", "big", 23, 16))),
    ("a small yellow triangle",
     _img("gray", ("triangle", "yellow", "small", 16, 16)),
     _img("gray", ("triangle", "yellow", "big", 16, 16))),
    ("a green circle on a white background",
     _img("white", ("circle", "green", "big", 16, 16)),
     _img("black", ("circle", "green", "big", 16, 16))),
    ("a purple circle",
     _img("gray", ("circle", "purple", "big", 16, 16)),
     _img("gray", ("circle", "red", "big", 16, 16))),
]


@pytest.mark.parametrize("prompt,good,bad", CASES, ids=[c[0] for c in CASES])
def test_judge_prefers_the_correct_image(prompt, good, bad):
    jg, jb = judge(good, prompt), judge(bad, prompt)
    assert jg.correct and not jb.correct
    assert jg.score > jb.score + 0.05


def test_judge_quality_drops_with_noise_and_blur():
    prompt = "a red circle left of a blue square"
    clean = CASES[0][1]
    noisy = np.clip(clean.astype(np.float32) + np.random.default_rng(0).normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    jc, jn = judge(clean, prompt), judge(noisy, prompt)
    assert jc.quality > jn.quality + 0.2 and jc.score > jn.score


def test_preference_rows_follow_pick_a_pic_and_hold_ties_and_contradictions():
    rng = np.random.default_rng(0)
    imgs = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)] for _ in range(30)]
    scores = [[0.5, 0.5, 0.52, 0.9] for _ in range(30)]
    rows = make_rows(["a red circle"] * 15 + ["two blue squares"] * 15, imgs, scores, seed=0,
                     cfg=AnnotatorConfig(second_opinion=0.5))
    stats = pair_stats(rows)
    assert stats["ties"] > 0 and stats["contradictory_pairs"] > 0
    assert 0 < stats["absolute_winner_rows"] < stats["rows"] - stats["ties"]
    for r in rows:
        assert r["jpg_0"][:2] == b"\xff\xd8" and r["label_0"] + r["label_1"] == 1.0
        tie = r["label_0"] == 0.5
        assert (r["best_image_uid"] not in (r["image_0_uid"], r["image_1_uid"])) == tie


def test_pair_stats_absolute_winners_rule():
    # image a beats b and c (kept: never lost, won twice); b beats c once (dropped: b lost)
    base = {"caption": "x"}
    rows = [base | {"image_0_uid": "a", "image_1_uid": "b", "label_0": 1.0, "label_1": 0.0},
            base | {"image_0_uid": "c", "image_1_uid": "a", "label_0": 0.0, "label_1": 1.0},
            base | {"image_0_uid": "b", "image_1_uid": "c", "label_0": 1.0, "label_1": 0.0}]
    assert pair_stats(rows) == {"rows": 3, "ties": 0, "contradictory_pairs": 0, "absolute_winner_rows": 2}


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "world.json":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_tiny_build_is_deterministic_for_a_seed(tmp_path):
    from ncp.world.build import build_world, tiny_config

    quiet = lambda s: None  # noqa: E731
    w1 = build_world(tmp_path / "a", tiny_config(0), log=quiet)
    build_world(tmp_path / "b", tiny_config(0), log=quiet)
    build_world(tmp_path / "c", tiny_config(1), log=quiet)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert "data/train-00000.parquet" in da and "model/unet/diffusion_pytorch_model.safetensors" in da
    assert da == db
    assert da["data/train-00000.parquet"] != dc["data/train-00000.parquet"]
    assert w1["stats"]["pairs"]["rows"] > 0
    # --data-only on a built world redoes the data from its saved pipeline: same files as the full build
    meta = tmp_path / "b" / "world.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"build_notes": "by hand", "reused_stages": True}))
    w2 = build_world(tmp_path / "b", tiny_config(0), log=quiet, data_only=True)
    assert _digest(tmp_path / "b") == da
    assert w2["build_notes"] == "by hand" and w2["data_only"] and w2["stats"]["pairs"] == w1["stats"]["pairs"]
    assert w2["reused_stages"]  # describes how the kept model was built, not this data pass
    with pytest.raises(FileNotFoundError, match="needs a built world"):
        build_world(tmp_path / "empty", tiny_config(0), log=quiet, data_only=True)


def test_flawed_phases_train_the_unet_and_leave_the_text_encoder_frozen(tmp_path):
    """Phase 1 (truthful captions) trains the text encoder; phase 2 (the flawed captioner) must not."""
    from safetensors.torch import load_file

    from ncp.world.build import build_world, tiny_config

    cfg = tiny_config(0)
    assert cfg.pretrain.clean_phases == 1 and len(cfg.pretrain.phases()) == 2 and cfg.pretrain.color_confusion > 0
    build_world(tmp_path, cfg, log=lambda s: None, keep_stages=True)
    phase1, final = tmp_path / ".stages", tmp_path / "model"
    te1, te2 = load_file(phase1 / "text_encoder" / "model.safetensors"), load_file(final / "text_encoder" / "model.safetensors")
    assert te1.keys() == te2.keys() and all(torch.equal(te1[k], te2[k]) for k in te1)
    u1 = load_file(phase1 / "unet" / "diffusion_pytorch_model.safetensors")
    u2 = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(u1[k], u2[k]) for k in u1)


def test_flawed_captioner_swaps_only_confused_colours_at_its_rate_and_keeps_the_images():
    from ncp.world.pretrain import SceneStream

    pairs = (("red", "purple"), ("blue", "green"))
    truthful = SceneStream(5, 32, set())
    flawed = SceneStream(5, 32, set(), confusion=0.6, pairs=pairs)
    caps0, imgs0 = truthful.batch(300)
    caps1, imgs1 = flawed.batch(300)
    assert torch.equal(imgs0, imgs1)  # the captioner has its own generator: same scenes
    swapped = kept = 0
    partner = {"red": "purple", "purple": "red", "blue": "green", "green": "blue"}
    for true, said in zip(caps0, caps1):
        for a, b in zip(true.split(), said.split(), strict=True):
            if a in partner:
                assert b in (a, partner[a])
                swapped, kept = swapped + (b != a), kept + (b == a)
            else:
                assert a == b  # yellow, shapes, sizes, positions, backgrounds: always true
    rate = swapped / (swapped + kept)
    assert swapped + kept > 250 and abs(rate - 0.6) < 0.07  # binomial sd ~0.025
    heldout = set(caps1[:50])
    again = SceneStream(6, 32, heldout, confusion=0.6, pairs=pairs)
    assert not heldout & set(again.batch(300)[0])  # never a held-out caption, true or flawed
    with pytest.raises(ValueError, match="outside the world's palette.*pink"):
        SceneStream(0, 32, set(), confusion=0.5, pairs=(("red", "pink"),))


def test_flawed_captioner_warns_once_when_it_must_write_the_truthful_caption():
    """At confusion 1 with the only flawed naming held out, the captioner falls back to the truth, loudly."""
    import warnings

    from ncp.world.pretrain import SceneStream

    p = Prompt(kind="single", color="red", shape="circle", size="big", position="on the left", background="white")
    flawed = Prompt(kind="single", color="purple", shape="circle", size="big", position="on the left", background="white")
    stream = SceneStream(0, 32, {flawed.caption()}, confusion=1.0, pairs=(("red", "purple"),))
    with pytest.warns(UserWarning, match="truthful caption"):
        assert stream.caption(p) == p.caption()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not once per caption
        assert stream.caption(p) == p.caption()
    assert SceneStream(0, 32, set(), confusion=1.0, pairs=(("red", "purple"),)).caption(p) == flawed.caption()


def test_world_jpegs_keep_full_chroma():
    """4:4:4 JPEG: Pillow's default 4:2:0 smears the colours of 2-3 px shapes at 32 px."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 15:17] = (220, 30, 30)  # a 2 px red bar on black
    from ncp.world.prefdata import jpeg_bytes

    jpeg = Image.open(io.BytesIO(jpeg_bytes(img, 95)))
    assert jpeg.layer[0][1:3] == (1, 1)  # luma sampled 1x1: no chroma subsampling
    dec = np.asarray(jpeg.convert("RGB")).astype(int)
    assert np.abs(dec - img).max() <= 8  # measured 3; 4:2:0 puts red into the black neighbours (66)
    smeared = np.asarray(Image.open(io.BytesIO(jpeg_bytes(img, 95, "4:2:0"))).convert("RGB")).astype(int)
    assert np.abs(smeared - img).max() > 40


BUNDLE = bundle_path()
needs_bundle = pytest.mark.skipif(not (BUNDLE / "model" / "model_index.json").is_file(), reason="bundle not built")


@needs_bundle
def test_shipped_bundle_has_pick_a_pic_data_and_disjoint_heldout_prompts():
    table = pq.read_table(BUNDLE / "data" / "train-00000.parquet")
    for col in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid", "best_image_uid"):
        assert col in table.column_names
    rows = table.to_pylist()
    stats = pair_stats(rows)
    assert stats["ties"] > 0 and stats["contradictory_pairs"] > 0
    assert 0 < stats["absolute_winner_rows"] < stats["rows"] - stats["ties"]
    heldout = (BUNDLE / "data" / "heldout_prompts.txt").read_text().split("\n")
    heldout = [h for h in heldout if h]
    assert len(heldout) >= 32 and not set(heldout) & {r["caption"] for r in rows}
    assert all(parse_caption(h) is not None for h in heldout)
    size = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert size < 20e6


@needs_bundle
def test_shipped_bundle_loads_as_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(BUNDLE / "model"))
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
