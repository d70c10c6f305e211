"""ncp.families: the model-family seam. SD1.5 and SDXL behind it keep every loss bit-identical
(tests/test_fixed_seed.py: the EPYC record was written by the code before the seam); here: recognising a
folder, the registry, the conditions each family makes, and that the core never names a family."""
from __future__ import annotations

import ast
import json
import sys
import typing
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from ncp.families import FAMILIES, Conditioning, Family, detect_kind, family  # noqa: E402


def test_folders_are_recognised(tiny_sd15, tiny_sdxl, tmp_path):
    assert detect_kind(str(tiny_sd15)) == "sd15" and detect_kind(str(tiny_sdxl)) == "sdxl"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert detect_kind(str(tmp_path / "m")) == "sdxl"
    assert detect_kind("org/some-xl-model") == "sdxl" and detect_kind("org/sd-v1-5") == "sd15"  # no folder: by name
    with pytest.raises(ValueError, match=r"unknown model family 'kandinsky' \(known: flux, sd15, sd3, sdxl\)"):
        family("kandinsky")


def test_config_offers_exactly_the_registered_families():
    from ncp.config import ModelConfig

    kinds = typing.get_args(typing.get_type_hints(ModelConfig)["kind"])
    assert set(kinds) == {"auto", *FAMILIES}


def test_each_family_conditions_as_its_pipeline_does(tiny_sd15, tiny_sdxl):
    """The condition of a caption equals what the family's own diffusers pipeline computes."""
    from ncp.models import encode_prompts, load_models
    from ncp.sampling import load_pipeline

    captions = ["a red circle", "two blue squares"]
    for path in (tiny_sd15, tiny_sdxl):
        models = load_models(str(path), "auto", torch.device("cpu"), torch.float32)
        cond = encode_prompts(models, captions)
        pipe = load_pipeline(path)
        out = pipe.encode_prompt(captions, "cpu", 1, False) if models.kind == "sd15" else \
            pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        torch.testing.assert_close(cond.hidden_states, out[0], rtol=0, atol=0)
        if models.kind == "sdxl":
            torch.testing.assert_close(cond.pooled, out[2], rtol=0, atol=0)
        else:
            assert cond.pooled is None and family("sd15").time_ids(torch.zeros(2, 2), torch.zeros(2, 2), 32) is None


def test_a_new_family_is_one_subclass():
    """A family registered in FAMILIES is recognised and used without touching the core (the seam's point)."""

    from ncp.families.unet import UNetFamily

    class Toy(UNetFamily):
        name = "toy"
        pipeline = "StableDiffusionPipeline"
        lora_loader = "StableDiffusionLoraLoaderMixin"
        text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),)
        tap_presets = {"auto": "multiscale", "authors": "mid"}
        kohya_base_model = "toy"

        def matches(self, model_index):
            return model_index.get("_class_name") == "ToyPipeline"

        def encode(self, tokenizers, encoders, captions, device, dtype):
            return Conditioning(torch.zeros(len(captions), 3, 4))

    from ncp.models import resolve_taps

    FAMILIES_BEFORE = dict(FAMILIES)
    try:
        FAMILIES.clear()
        FAMILIES.update({"toy": Toy(), **FAMILIES_BEFORE})
        assert resolve_taps(["auto"], "toy", 4) == [0, 1, 2, 3, "mid"]
        assert resolve_taps(["authors"], "toy", 4) == ["mid"]
        assert family("toy").encode([], [], ["a", "b"], "cpu", torch.float32).hidden_states.shape == (2, 3, 4)
    finally:
        FAMILIES.clear()
        FAMILIES.update(FAMILIES_BEFORE)


def test_the_core_never_names_a_family():
    """Outside ncp/families (and the config's choices and the demo world), no module compares a family name:
    what differs between families is asked of the family."""
    offenders = []
    for path in (ROOT / "python" / "ncp").rglob("*.py"):
        rel = path.relative_to(ROOT / "python" / "ncp").as_posix()
        if rel.startswith(("families/", "world/")) or rel == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(n in FAMILIES for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"family names compared outside ncp.families: {offenders}"
