"""SDXL: two CLIP text encoders (penultimate layers, concatenated; the second's pooled projection) and the
original-size / crop / target-size ids as added conditions."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ncp.families.base import Conditioning, token_ids
from ncp.families.unet import UNetFamily


class SDXL(UNetFamily):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"
    lora_loader = "StableDiffusionXLLoraLoaderMixin"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),
                     ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    tap_presets = {"auto": "paper", "authors": "paper"}  # the authors' SDXL script taps the last down block
    kohya_base_model = "sdxl_base_v1-0"
    kohya_names = "sgm"  # the original U-Net's input_blocks / output_blocks numbering
    vae_overflows_in_fp16 = True

    def matches(self, model_index: dict[str, Any]) -> bool:
        return "text_encoder_2" in model_index or "XL" in model_index.get("_class_name", "")

    def encode(self, tokenizers, encoders, captions, device, dtype) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            out = encoder(token_ids(tokenizer, captions, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(device=device, dtype=dtype))
            pooled = out[0].to(device=device, dtype=dtype)  # the projected text embedding of the last encoder
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def time_ids(self, original_sizes: Tensor, crop_top_left: Tensor, resolution: int) -> Tensor:
        """(B, 6): original (h, w), crop (top, left), target (h, w), as SDXL was trained."""
        target = torch.tensor([resolution, resolution], dtype=original_sizes.dtype).expand_as(original_sizes)
        return torch.cat([original_sizes, crop_top_left, target], dim=1).float()
