"""Model families: what differs between SD1.5, SDXL and the families to come, behind one small interface.

A family says how a diffusers pipeline folder of its kind is recognised, which text encoders it has and how
a prompt becomes the denoiser's condition (:class:`Conditioning`: hidden states, SDXL's pooled embedding and
size/crop ids), which pipeline class samples it and which LoRA loader writes its adapters, which encoder taps
its tap presets mean, and how kohya-style tools name its modules. The training core asks ``family(kind)`` and
never tests a family's name; adding a family is one module here (registered in :data:`FAMILIES`) and its
test. A family also answers the training step's questions: its denoiser (class, folder, how it is called), its
noise schedule (``ncp.schedule``: DDPM for the U-Nets, flow matching for the transformers), its perceptual
encoder's taps and features, and its LoRA format (``unet.py`` holds what SD1.5 and SDXL share).

A new family: a module here with a Family subclass, listed in FAMILIES, and its test. This package imports
no other ncp module but the leaves ``ncp.pipelines`` and ``ncp.schedule``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ncp.families.base import Conditioning, Family, unwrap
from ncp.families.flux import Flux
from ncp.families.sd3 import SD3
from ncp.families.sd15 import SD15
from ncp.families.sdxl import SDXL

__all__ = ["Conditioning", "FAMILIES", "Family", "denoiser_family", "denoiser_folders", "detect_kind", "family",
           "pipeline_family"]

# every family, by name; a folder is the first whose ``matches`` accepts its model_index.json (SD3 and Flux
# before SDXL: they too have a second text encoder)
FAMILIES: dict[str, Family] = {f.name: f for f in (SD3(), Flux(), SDXL(), SD15())}


def family(kind: str) -> Family:
    """The family called ``kind`` (``sd15``, ``sdxl``), or a ValueError listing the known ones."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ValueError(f"unknown model family {kind!r} (known: {', '.join(sorted(FAMILIES))})") from None


def detect_kind(path: str) -> str:
    """The family of a pipeline folder, from its ``model_index.json`` (else from the name: 'xl' -> sdxl)."""
    index = Path(path) / "model_index.json"
    if index.is_file():
        spec = json.loads(index.read_text())
        return next((f.name for f in FAMILIES.values() if f.matches(spec)), "sd15")
    return "sdxl" if "xl" in path.lower() else "sd15"


def denoiser_folders() -> list[str]:
    """The pipeline folders a denoiser lives in, over the families (``unet``, ``transformer``)."""
    return sorted({f.denoiser for f in FAMILIES.values()})


def denoiser_family(model) -> Family:
    """A family whose denoiser class ``model`` is: what its LoRA format and tapping depend on (SD1.5 and SDXL
    share the U-Net's). Wrappers are looked through: DDP's ``.module``, torch.compile's ``._orig_mod``."""
    name = type(unwrap(model)).__name__
    for fam in FAMILIES.values():
        if fam.denoiser_class == name:
            return fam
    raise ValueError(f"no model family has a {name} denoiser (known: "
                     f"{', '.join(sorted({f.denoiser_class for f in FAMILIES.values()}))})")


def pipeline_family(pipe) -> Family:
    """The family whose diffusers pipeline class ``pipe`` is (``StableDiffusion3Pipeline`` -> SD3), or a
    ValueError naming the known pipeline classes."""
    name = type(pipe).__name__
    for fam in FAMILIES.values():
        if fam.pipeline == name:
            return fam
    raise ValueError(f"no model family samples with a {name} (known: "
                     f"{', '.join(sorted(f.pipeline for f in FAMILIES.values()))})")
