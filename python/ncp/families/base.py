"""The :class:`Family` interface and the :class:`Conditioning` it produces (``ncp.families`` has the registry)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, for B prompts (SDXL adds pooled embeddings and time ids)."""

    hidden_states: Tensor  # (B, L, D)
    pooled: Tensor | None = None  # (B, D2), SDXL
    time_ids: Tensor | None = None  # (B, 6), SDXL

    def added_cond_kwargs(self) -> dict[str, Tensor] | None:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def repeat(self, n: int) -> "Conditioning":
        """The condition for ``n`` stacked copies of the batch (winners then losers, ...)."""
        rep = lambda x: None if x is None else x.repeat(n, *([1] * (x.dim() - 1)))  # noqa: E731
        return Conditioning(rep(self.hidden_states), rep(self.pooled), rep(self.time_ids))


def token_ids(tokenizer, captions: list[str], device: torch.device) -> Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    pipeline: ClassVar[str]  # the diffusers pipeline class that samples it
    lora_loader: ClassVar[str]  # the diffusers LoRA loader mixin whose save_lora_weights writes its adapters
    # (tokenizer subfolder, text encoder subfolder, transformers class) of each text encoder, in order
    text_encoders: ClassVar[tuple[tuple[str, str, str], ...]]
    # what the tap presets "auto" and "authors" mean for it (``ncp.models.resolve_taps``)
    tap_presets: ClassVar[dict[str, str]]
    kohya_base_model: ClassVar[str]  # sd-scripts' ss_base_model_version
    kohya_names: ClassVar[str] = "diffusers"  # how kohya-style tools name its modules: "diffusers" or "sgm"
    vae_overflows_in_fp16: ClassVar[bool] = False
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}  # extra from_pretrained / constructor arguments

    def matches(self, model_index: dict[str, Any]) -> bool:
        raise NotImplementedError

    def encode(self, tokenizers: list, encoders: list, captions: list[str], device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        raise NotImplementedError

    def time_ids(self, original_sizes: Tensor, crop_top_left: Tensor, resolution: int) -> Tensor | None:
        """Added size and crop conditions of a batch (None: the family has none)."""
        return None

    def pipeline_class(self):
        from ncp.pipelines import bind_pil_image_processors

        bind_pil_image_processors()
        import diffusers

        return getattr(diffusers, self.pipeline)

    def lora_loader_class(self):
        import diffusers.loaders

        return getattr(diffusers.loaders, self.lora_loader)

    def training_pipeline(self, vae, text_encoders: list, tokenizers: list, unet, scheduler):
        """The family's pipeline around existing modules (validation draws with the training U-Net)."""
        parts: dict[str, Any] = {"vae": vae, "unet": unet, "scheduler": scheduler}
        for i, (tok, enc) in enumerate(zip(tokenizers, text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tok, enc
        return self.pipeline_class()(**parts, **self.pipeline_kwargs)
