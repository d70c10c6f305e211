"""FLUX.1 ([dev], [schnell]): a double- then single-stream MM-DiT (``FluxTransformer2DModel``) trained by
rectified flow on 2x2-packed latents, conditioned on T5's last layer (tokens) and CLIP's pooled output, with
NCP in the transformer's own space (``ncp.families.dit``; docs/method.md, "NCP for flow-matching
transformers").

The step hands a family (B, 16, h, w) latents and the schedule's timestep ``1000 sigma``; Flux's transformer
takes (B, hw/4, 64) tokens, their positions (``img_ids``, ``txt_ids``), ``sigma`` itself and, for the
guidance-distilled [dev], the guidance value: :meth:`Flux.denoise` packs, calls and unpacks, as diffusers'
``FluxPipeline`` and its LoRA training script do.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ncp.families.base import Conditioning, Family, t5_length, token_ids, unwrap
from ncp.families.dit import flux_block_features, resolve_block_taps
from ncp.schedule import FlowSchedule


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): each 2x2 patch one token, channels then the patch's rows and
    columns (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """:func:`pack_latents`' inverse, to (B, C, h, w) (``FluxPipeline._unpack_latents``)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(hw/4, 3) positions of the packed tokens: (0, row, column) (``FluxPipeline._prepare_latent_image_ids``
    on the packed grid)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(Family):
    name = "flux"
    pipeline = "FluxPipeline"
    lora_loader = "FluxLoraLoaderMixin"
    text_encoders = (("tokenizer", "text_encoder", "CLIPTextModel"),
                     ("tokenizer_2", "text_encoder_2", "T5EncoderModel"))
    tap_presets = {}  # block indices (double-stream, then single-stream), or "auto" (``dit.default_taps``)
    kohya_base_model = "flux1"
    denoiser = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    compile_regions = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    max_sequence_length = 512  # T5 tokens: the pipeline's default (``t5_length``: or the tokenizer's, if shorter)
    # The distilled guidance [dev] is trained with: diffusers' train_dreambooth_lora_flux.py default
    # (--guidance_scale 3.5, passed whenever transformer.config.guidance_embeds), also the pipeline's sampling
    # default. [schnell] has no guidance embedding and gets None.
    guidance_scale = 3.5

    def matches(self, model_index: dict[str, Any]) -> bool:
        return model_index.get("_class_name", "") == "FluxPipeline"

    def encode(self, tokenizers, encoders, captions, device, dtype) -> Conditioning:
        """As ``FluxPipeline.encode_prompt`` (one image per prompt): T5's last hidden states are the tokens, the
        CLIP text model's pooled output the pooled condition (``txt_ids`` are zeros: ``denoise`` makes them)."""
        clip_tok, clip = tokenizers[0], encoders[0]
        pooled = clip(token_ids(clip_tok, captions, clip.device), output_hidden_states=False).pooler_output
        t5_tok, t5 = tokenizers[1], encoders[1]
        ids = t5_tok(captions, padding="max_length", max_length=t5_length(self.max_sequence_length, t5_tok), truncation=True,
                     return_tensors="pt").input_ids.to(t5.device)
        states = t5(ids, output_hidden_states=False)[0]
        return Conditioning(states.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype))

    def text_tokens(self, tokenizers: list) -> int:
        return t5_length(self.max_sequence_length, tokenizers[1])  # T5's tokens only (CLIP gives the pooled)

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        return {"max_sequence_length": t5_length(self.max_sequence_length, pipe.tokenizer_2)}

    # ---------------------------------------------------------------- the training step

    def training_schedule(self, scheduler, device: torch.device, sigma_sampling: str = "logit_normal"):
        return FlowSchedule.from_scheduler(scheduler, device, sigma_sampling)

    def guidance(self, model: nn.Module, batch: int, device: torch.device) -> Tensor | None:
        """The guidance input (B,) of a guidance-embedded transformer ([dev]), else None ([schnell])."""
        if not unwrap(model).config.guidance_embeds:
            return None
        return torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)

    def _inputs(self, model: nn.Module, x: Tensor, cond: Conditioning) -> dict[str, Tensor | None]:
        b, _, h, w = x.shape
        return dict(txt_ids=torch.zeros(cond.hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
                    img_ids=latent_image_ids(h, w, x.device, x.dtype), guidance=self.guidance(model, b, x.device))

    def denoise(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The velocity (B, 16, h, w) at the schedule's ``timestep`` (``1000 sigma``; Flux takes ``sigma``)."""
        _, _, h, w = x.shape
        out = model(hidden_states=pack_latents(x), timestep=timestep / 1000, encoder_hidden_states=cond.hidden_states,
                    pooled_projections=cond.pooled, **self._inputs(model, x, cond)).sample
        return unpack_latents(out, h, w)

    def tap_units(self, model: nn.Module) -> int:
        model = unwrap(model)
        return len(model.transformer_blocks) + len(model.single_transformer_blocks)

    def resolve_taps(self, spec: list[str], units: int) -> list[int]:
        return resolve_block_taps(spec, units)

    def encoder_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning,
                         taps: list) -> list[Tensor]:
        """Image-token hidden states (B, hw/4, D) after the tapped blocks, on the packed ``x``."""
        inputs = self._inputs(model, x, cond)
        return flux_block_features(model, pack_latents(x), timestep / 1000, cond.hidden_states, cond.pooled,
                                   inputs["txt_ids"], inputs["img_ids"], inputs["guidance"], taps)

    def lora_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """peft's names (``…lora_A/lora_B.weight``), as diffusers' Flux training script saves them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)

    def peft_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state
