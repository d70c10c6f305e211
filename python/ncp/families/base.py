"""The :class:`Family` interface and the :class:`Conditioning` it produces (``ncp.families`` has the registry)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


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


def unwrap(model: nn.Module) -> nn.Module:
    """The denoiser inside its wrappers: DDP's ``.module``, torch.compile's ``._orig_mod``."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def t5_length(default: int, tokenizer) -> int:
    """T5 tokens a flow family encodes a prompt to: the pipeline's default ``max_sequence_length``, or the
    tokenizer's ``model_max_length`` where that is shorter (a small model trained on short prompts)."""
    return min(default, int(tokenizer.model_max_length))


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
    denoiser: ClassVar[str]  # the pipeline's denoiser component and its folder: "unet", "transformer"
    denoiser_class: ClassVar[str]  # its diffusers class
    scheduler_class: ClassVar[str]  # the diffusers scheduler its training schedule is read from (scheduler/)
    compile_regions: ClassVar[tuple[str, ...]] = ()  # the block classes model.compile_unet=regional compiles

    # ---------------------------------------------------------------- the training step's questions

    def training_schedule(self, scheduler, device: torch.device, sigma_sampling: str = "logit_normal"):
        """The step's noise schedule (``ncp.schedule``: DDPM or flow) from the model's scheduler."""
        raise NotImplementedError

    def denoise(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The denoiser's prediction for noised latents ``x`` at ``timestep`` (the schedule's model input)."""
        raise NotImplementedError

    def tap_units(self, model: nn.Module) -> int:
        """How many tappable blocks the denoiser has (U-Net down blocks, transformer blocks)."""
        raise NotImplementedError

    def resolve_taps(self, spec: list[str], units: int) -> list:
        """``objective.taps`` (a preset or a list) as this family's taps, in forward order; ValueError if bad."""
        raise NotImplementedError

    def encoder_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning,
                         taps: list) -> list[Tensor]:
        """The perceptual encoder's tapped features of ``x`` at ``timestep`` (call with the adapters off)."""
        raise NotImplementedError

    def lora_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter's weights as the family's pipeline LoRA loader reads them (without the denoiser prefix)."""
        raise NotImplementedError

    def peft_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``lora_state_dict``'s format back to peft's names (for ``set_peft_model_state_dict``)."""
        raise NotImplementedError

    def save_lora(self, out_dir, state: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Write ``pytorch_lora_weights.safetensors`` with the pipeline's own LoRA writer (keys prefixed with
        the denoiser's name, the adapter's config as metadata), so ``pipe.load_lora_weights`` reads it."""
        self.lora_loader_class().save_lora_weights(
            out_dir, safe_serialization=True,
            **{f"{self.denoiser}_lora_layers": state, f"{self.denoiser}_lora_adapter_metadata": metadata})

    def matches(self, model_index: dict[str, Any]) -> bool:
        raise NotImplementedError

    def encode(self, tokenizers: list, encoders: list, captions: list[str], device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        raise NotImplementedError

    def text_tokens(self, tokenizers: list) -> int:
        """The length of ``encode``'s token sequence (the U-Nets: the first tokenizer's)."""
        return tokenizers[0].model_max_length

    def sampling_kwargs(self, pipe) -> dict[str, Any]:
        """What the pipeline's ``__call__`` needs to condition as training does (SD3, Flux: the T5 length)."""
        return {}

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
        """The family's pipeline around existing modules (validation draws with the training denoiser)."""
        parts: dict[str, Any] = {"vae": vae, self.denoiser: unet, "scheduler": scheduler}
        for i, (tok, enc) in enumerate(zip(tokenizers, text_encoders)):
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tok, enc
        return self.pipeline_class()(**parts, **self.pipeline_kwargs)
