"""Stable Diffusion 1.x / 2.x: one CLIP text encoder (its last hidden layer), no added conditions."""
from __future__ import annotations

from typing import Any

import torch

from ncp.families.base import Conditioning, token_ids
from ncp.families.unet import UNetFamily


class SD15(UNetFamily):
    name = "sd15"
    pipeline = "StableDiffusionPipeline"
    lora_loader = "StableDiffusionLoraLoaderMixin"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    tap_presets = {"auto": "mid", "authors": "authors"}  # the authors' SD1.5 encoder scripts (docs/method.md)
    kohya_base_model = "sd_v1"
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def matches(self, model_index: dict[str, Any]) -> bool:
        return "unet" in model_index and "text_encoder_2" not in model_index

    def encode(self, tokenizers, encoders, captions, device, dtype) -> Conditioning:
        encoder = encoders[0]
        ids = token_ids(tokenizers[0], captions, encoder.device)
        return Conditioning(encoder(ids)[0].to(device=device, dtype=dtype))
