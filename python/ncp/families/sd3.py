"""Stable Diffusion 3 / 3.5: an MM-DiT (``SD3Transformer2DModel``) trained by rectified flow, conditioned on
CLIP-L + CLIP-G (penultimate layers, concatenated; their pooled projections) and T5 (its last layer), with
NCP in the transformer's own space (``ncp.families.dit``; docs/method.md, "NCP for flow-matching
transformers")."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ncp.families.base import Conditioning, Family, t5_length, token_ids
from ncp.families.dit import default_taps, resolve_block_taps, sd3_block_features
from ncp.schedule import FlowSchedule


class SD3(Family):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"
    lora_loader = "SD3LoraLoaderMixin"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                     ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                     ("tokenizer_3", "text_encoder_3", "T5EncoderModel"))
    tap_presets = {}  # block indices, or "auto" (``default_taps``); the U-Net presets mean nothing here
    kohya_base_model = "sd3"
    denoiser = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    compile_regions = ("JointTransformerBlock",)
    max_sequence_length = 256  # T5 tokens: the pipeline's default (``t5_length``: or the tokenizer's, if shorter)

    def matches(self, model_index: dict[str, Any]) -> bool:
        return model_index.get("_class_name", "").startswith("StableDiffusion3")

    def encode(self, tokenizers, encoders, captions, device, dtype) -> Conditioning:
        """As ``StableDiffusion3Pipeline.encode_prompt`` (one image per prompt, no clip skip): both CLIPs'
        penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens after them; the
        pooled condition is the two CLIPs' projected embeddings side by side."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
            out = encoder(token_ids(tokenizer, captions, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5_tok, t5 = tokenizers[2], encoders[2]
        ids = t5_tok(captions, padding="max_length", max_length=t5_length(self.max_sequence_length, t5_tok), truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids.to(t5.device)
        t5_hidden = t5(ids)[0]
        clip = torch.cat(hidden, dim=-1)
        clip = nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        states = torch.cat([clip.to(t5_hidden.dtype), t5_hidden], dim=-2)
        return Conditioning(states.to(device=device, dtype=dtype), torch.cat(pooled, dim=-1).to(device=device, dtype=dtype))

    def text_tokens(self, tokenizers: list) -> int:
        return tokenizers[0].model_max_length + t5_length(self.max_sequence_length, tokenizers[2])  # CLIP, then T5

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        return {"max_sequence_length": t5_length(self.max_sequence_length, pipe.tokenizer_3)}

    # ---------------------------------------------------------------- the training step

    def training_schedule(self, scheduler, device: torch.device, sigma_sampling: str = "logit_normal"):
        return FlowSchedule.from_scheduler(scheduler, device, sigma_sampling)

    def denoise(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                     pooled_projections=cond.pooled).sample

    def tap_units(self, model: nn.Module) -> int:
        return len(model.transformer_blocks)

    def resolve_taps(self, spec: list[str], units: int) -> list[int]:
        return resolve_block_taps(spec, units)

    def encoder_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning,
                         taps: list) -> list[Tensor]:
        return sd3_block_features(model, x, timestep, cond.hidden_states, cond.pooled, taps)

    def lora_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """peft's names (``…lora_A/lora_B.weight``), as diffusers' SD3 training script saves them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)

    def peft_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state
