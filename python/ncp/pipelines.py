"""Diffusers pipelines for sampling with a base model and an ncp LoRA, without notices a user cannot act on.

Two notices came with every default run, and both are fixed where they arise:

- transformers 5 names the torchvision-backed image processors ``CLIPImageProcessor``
  (and ``SiglipImageProcessor``); without torchvision (which has no build for every
  torch ncp supports) the first import of such a name by diffusers' pipeline modules
  falls back to the PIL class with a warning. ncp's pipelines run no image processor
  (no safety checker, no IP-Adapter): ``ncp.families.Family.pipeline_class`` binds the PIL classes
  (:func:`bind_pil_image_processors`)
  first, which is exactly the fallback transformers takes, so the name resolves
  without it.
- ``pipe.load_lora_weights`` also looks for text-encoder LoRA keys and notes their
  absence; an ncp LoRA adapts the U-Net only, so :func:`load_unet_lora` loads it into
  the U-Net alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"
_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")  # what diffusers' SD/SDXL pipelines import


def bind_pil_image_processors() -> None:
    """Without torchvision, resolve transformers' image-processor names to their PIL classes, as its own
    fallback does, before diffusers imports them (see the module doc)."""
    from transformers import CLIPTextModel  # noqa: F401
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    # transformers 5 puts a new module object in sys.modules["transformers"] while it first loads a model class
    # (the import above): bind on the one the pipelines will import from
    transformers = sys.modules["transformers"]
    for name in _IMAGE_PROCESSORS:
        pil = getattr(transformers, f"{name}Pil", None)
        if pil is not None and name not in vars(transformers):
            setattr(transformers, name, pil)


def load_unet_lora(pipe, lora_dir: str | Path) -> None:
    """An ncp LoRA folder (``ncp.models.save_lora``) into the pipeline's U-Net; the same weights and scale as
    ``pipe.load_lora_weights`` gives, without looking for text-encoder keys."""
    pipe.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_FILE)
